"""The device fitter's route (``backends/onnx_fit.py``) run by onnxruntime's CPU provider: the same loss,
gradient and preconditioner products as the float64 reference, the same probes as the CPU path, and how
``--fit-device`` is chosen. On a GPU machine, tests/test_gpu_fit.py checks the same on CUDA."""

import dataclasses
import json

import numpy as np
import pytest

import probecore
import reference as ref
from onnx_models import save_convnet
from probecore.backends.onnx_fit import DeviceFitter, cuda_fitter
from probecore.backends.onnx_source import OnnxSource
from probecore.errors import ProbeError
from probecore.pipeline import loss_evaluator
from probecore.probe import FitOptions, _moments, _standardized, fit_probe, fit_probes
from probecore.run_spec import RunSpec

# (N, d, C, l2): one sample, one feature, wide, many classes, a layer's worth
CASES = [(1, 1, 2, 0.0), (50, 7, 3, 1e-3), (200, 16, 10, 1e-2), (2500, 300, 7, 1e-3), (9, 17, 1000, 1e-3)]


@pytest.fixture(scope="module")
def fitter():
    return DeviceFitter("cpu", threads=1)


@pytest.mark.parametrize("n, d, c, l2", CASES)
def test_value_gradient_and_held_out_loss_match_the_float64_reference(fitter, rng, n, d, c, l2):
    features = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, c, n)
    params = rng.standard_normal(d * c + c) * 0.5
    loss = fitter(features, labels, c, l2)
    loss.value_and_grad(params[::-1].copy())  # other parameters first: each evaluation binds its own
    value, grad = loss.value_and_grad(params)

    weights, bias = params[: d * c].reshape(d, c), params[d * c :]
    ref_value, ref_grad_w, ref_grad_b = ref.softmax_objective(features, labels, weights, bias, l2)
    ref_grad = np.concatenate([ref_grad_w.ravel(), ref_grad_b])
    assert grad.shape == params.shape and grad.dtype == np.float64
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())

    held_features, held_labels = rng.standard_normal((30, d)).astype(np.float32), rng.integers(0, c, 30)
    expected = ref.softmax_objective(held_features, held_labels, weights, bias, 0.0)[0]
    assert loss.held_out_loss(params, held_features, held_labels) == pytest.approx(expected, rel=1e-5)
    other = params[::-1].copy()  # new parameters, the same held-out arrays: their binding is reused
    expected = ref.softmax_objective(held_features, held_labels, other[: d * c].reshape(d, c), other[d * c :], 0.0)[0]
    assert loss.held_out_loss(other, held_features, held_labels) == pytest.approx(expected, rel=1e-5)


def test_the_gram_product_is_x_transposed_x_times_the_basis(fitter, rng):
    features = rng.standard_normal((700, 40)).astype(np.float32)
    basis = rng.standard_normal((40, 6)).astype(np.float32)
    loss = fitter(features, rng.integers(0, 3, 700), 3, 0.0)
    expected = features.astype(np.float64).T @ (features.astype(np.float64) @ basis)
    np.testing.assert_allclose(loss.gram_product(basis), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _layer_problem(rng, n, d, c):
    """Correlated features (a few latent factors plus noise) and labels that depend on them, not separably."""
    latent = rng.standard_normal((n, 8))
    features = latent @ rng.standard_normal((8, d)) + rng.standard_normal((n, d)) + rng.uniform(-5, 5, d)
    labels = (latent[:, :3] @ rng.standard_normal((3, c)) + 1.5 * rng.standard_normal((n, c))).argmax(axis=1)
    return features.astype(np.float32), labels


def _objective(probe, features, labels):
    mean, scale = _moments(features)
    return ref.softmax_objective(_standardized(features, mean, scale), labels, probe.weights, probe.bias, probe.l2)[0]


@pytest.mark.parametrize("n, d, c", [(1500, 24, 4), (2000, 300, 10), (1200, 64, 40)])  # 300: preconditioned
def test_a_whole_fit_gives_the_cpu_paths_probe(fitter, rng, n, d, c):
    features, labels = _layer_problem(rng, n + 1000, d, c)
    train, valid, test = slice(0, n), slice(n, n + 500), slice(n + 500, None)
    fit = (features[train], labels[train], c, features[valid], labels[valid], FitOptions(threads=1))
    on_host, on_device = fit_probe(*fit), fit_probe(*fit, evaluator=fitter)
    assert on_device.l2 == on_host.l2
    host_objective = _objective(on_host, features[train], labels[train])
    assert _objective(on_device, features[train], labels[train]) == pytest.approx(host_objective, rel=1e-4)
    errors = [probe.evaluate(features[test], labels[test]).error for probe in (on_host, on_device)]
    assert abs(errors[0] - errors[1]) <= 0.001 + 1e-12


def test_several_layers_fitted_at_once_share_the_sessions(rng):
    n, c = 1200, 5
    layers = {f"layer{i}": _layer_problem(np.random.default_rng([i, 7]), n, d, c)[0] for i, d in enumerate([16, 40, 9])}
    labels = _layer_problem(rng, n, 4, c)[1]
    train = {name: x[:900] for name, x in layers.items()}
    valid = {name: x[900:] for name, x in layers.items()}
    options = FitOptions(threads=3, l2=(1e-1, 1e-2))
    on_host = fit_probes(train, labels[:900], c, valid, labels[900:], options)
    on_device = fit_probes(train, labels[:900], c, valid, labels[900:], options, evaluator=DeviceFitter("cpu"))
    for name in layers:
        assert on_device[name].l2 == on_host[name].l2
        host_objective = _objective(on_host[name], train[name], labels[:900])
        assert _objective(on_device[name], train[name], labels[:900]) == pytest.approx(host_objective, rel=1e-4)


class _CpuFittedSource(OnnxSource):
    """An ONNX source whose GPU fitter is onnxruntime's CPU provider: the pipeline's plumbing, tested here."""

    def loss_evaluator(self, fit_device):
        return DeviceFitter("cpu")


def test_a_run_fitted_through_the_source_s_fitter_reports_the_cpu_run_s_probes(tmp_path, rng):
    model = save_convnet(tmp_path / "convnet.onnx", rng)
    x = rng.normal(size=(400, 3, 8, 8)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[:, 1].mean(axis=(1, 2)) > 0)
    dataset = probecore.split_dataset(x, y, seed=1)
    spec = RunSpec(layers=("relu", "swish", "pool"), fit=FitOptions(threads=1))
    on_host = probecore.run_probes(OnnxSource(model, device="cpu"), dataset, spec)
    device_spec = dataclasses.replace(spec, fit_device="cuda")
    on_device = probecore.run_probes(_CpuFittedSource(model, device="cpu"), dataset, device_spec)
    assert on_host.settings["fit_device"] == {"device": "cpu"}
    assert on_device.settings["fit_device"]["evaluator"] == "onnxruntime"
    for host, device in zip(on_host.layers, on_device.layers):
        assert device.l2 == host.l2
        assert abs(device.metrics["test"].error - host.metrics["test"].error) <= 0.001 + 1e-12, host.name
        assert device.metrics["train"].loss == pytest.approx(host.metrics["train"].loss, rel=1e-3)


def test_fit_device_must_be_one_of_three():
    with pytest.raises(ProbeError, match="fit device must be one of auto, cpu, cuda, got 'gpu'"):
        RunSpec(fit_device="gpu")
    assert RunSpec.from_dict(RunSpec(fit_device="cpu").to_dict()).fit_device == "cpu"


def test_cuda_is_refused_in_one_line_where_no_fitter_can_use_it(tmp_path):
    source = probecore.ArraySource({"a": np.zeros((4, 2), np.float32)})
    with pytest.raises(ProbeError, match="^--fit-device cuda was asked for, but ArraySource offers no GPU fitter"):
        loss_evaluator(source, "cuda", probecore.LocalEngine())
    assert loss_evaluator(source, "auto", probecore.LocalEngine()) is None

    class RemoteEngine:  # any engine that fits elsewhere, as the Ray engine does
        pass

    from probecore.bundled import DEMO_MODEL

    onnx_source = _CpuFittedSource(DEMO_MODEL)
    with pytest.raises(ProbeError, match="the Ray engine fits probes on its workers' CPUs"):
        loss_evaluator(onnx_source, "cuda", RemoteEngine())
    assert loss_evaluator(onnx_source, "auto", RemoteEngine()) is None
    assert loss_evaluator(onnx_source, "cpu", probecore.LocalEngine()) is None


@pytest.mark.skipif(cuda_fitter() is not None, reason="CUDA works here: tests/test_gpu_fit.py covers this machine")
def test_without_cuda_auto_fits_on_the_cpu_quietly_and_cuda_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from probecore.bundled import DEMO_DATA, DEMO_MODEL
    from probecore.cli.app import app

    runner = CliRunner()
    command = ["run", str(DEMO_MODEL), "--data", str(DEMO_DATA), "--layers", "relu3", "--no-cache", "-q"]
    refused = runner.invoke(app, [*command, "--fit-device", "cuda", "--out", str(tmp_path / "cuda")])
    assert refused.exit_code == 1
    assert refused.stderr.count("\n") == 1 and "--fit-device cuda was asked for" in refused.stderr
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]'" in refused.stderr and not (tmp_path / "cuda").exists()
    done = runner.invoke(app, [*command, "--out", str(tmp_path / "auto")])
    assert done.exit_code == 0 and done.stderr == ""
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["settings"]["fit_device"] == {"device": "cpu"} and report["settings"]["spec"]["fit_device"] == "auto"
