"""Probes fitted on CUDA (``--fit-device cuda``) are the CPU path's probes: the loss and gradient against the
float64 reference, whole fits against the CPU fitter (objective within 1e-4 relative, test errors within 0.1
points), and a run. Skipped, saying so, where onnxruntime cannot use CUDA; tests/test_onnx_fit.py checks the
same route on onnxruntime's CPU provider everywhere."""

import dataclasses

import numpy as np
import pytest

import probecore
import reference as ref
from onnx_models import save_convnet
from probecore.backends.onnx_fit import cuda_fitter
from probecore.backends.onnx_source import OnnxSource
from probecore.probe import FitOptions, fit_probe
from probecore.run_spec import RunSpec
from test_onnx_fit import _layer_problem, _objective

FITTER = cuda_fitter()
pytestmark = pytest.mark.skipif(
    FITTER is None, reason="no GPU fit here: onnxruntime cannot use CUDA (needs onnxruntime-gpu, an NVIDIA GPU, CUDA)"
)


CASES = [(1, 1, 2, 0.0), (200, 16, 10, 1e-2), (2500, 300, 7, 1e-3), (9, 17, 1000, 1e-3)]  # (N, d, C, l2)


@pytest.mark.parametrize("n, d, c, l2", CASES)
def test_value_and_gradient_on_cuda_match_the_float64_reference(rng, n, d, c, l2):
    features = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, c, n)
    loss = FITTER(features, labels, c, l2)
    for _ in range(3):  # new parameters each time, on the same bindings: each evaluation sees its own
        params = rng.standard_normal(d * c + c) * 0.5
        value, grad = loss.value_and_grad(params)
        weights, bias = params[: d * c].reshape(d, c), params[d * c :]
        ref_value, ref_grad_w, ref_grad_b = ref.softmax_objective(features, labels, weights, bias, l2)
        ref_grad = np.concatenate([ref_grad_w.ravel(), ref_grad_b])
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max())
        expected = ref.softmax_objective(features[:5], labels[:5], weights, bias, 0.0)[0]
        assert loss.held_out_loss(params, features[:5], labels[:5]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n, d, c", [(1500, 24, 4), (4000, 512, 10), (4000, 1024, 100)])
def test_probes_fitted_on_cuda_are_the_cpu_paths(rng, n, d, c):
    features, labels = _layer_problem(rng, n + 2000, d, c)
    train, valid, test = slice(0, n), slice(n, n + 1000), slice(n + 1000, None)
    fit = (features[train], labels[train], c, features[valid], labels[valid], FitOptions())
    on_host, on_device = fit_probe(*fit), fit_probe(*fit, evaluator=FITTER)
    assert on_device.l2 == on_host.l2
    host_objective = _objective(on_host, features[train], labels[train])
    assert _objective(on_device, features[train], labels[train]) == pytest.approx(host_objective, rel=1e-4)
    errors = [probe.evaluate(features[test], labels[test]).error for probe in (on_host, on_device)]
    assert abs(errors[0] - errors[1]) <= 0.001 + 1e-12


def test_a_run_with_fit_device_cuda_reports_the_cpu_run_s_probes(tmp_path, rng):
    model = save_convnet(tmp_path / "convnet.onnx", rng)
    x = rng.normal(size=(600, 3, 8, 8)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[:, 1].mean(axis=(1, 2)) > 0)
    dataset = probecore.split_dataset(x, y, seed=1)
    spec = RunSpec(layers=("relu", "swish", "pool"), fit_device="cpu")
    on_host = probecore.run_probes(OnnxSource(model, device="cuda"), dataset, spec)
    auto = dataclasses.replace(spec, fit_device="auto")
    on_device = probecore.run_probes(OnnxSource(model, device="cuda"), dataset, auto)
    assert on_host.settings["fit_device"] == {"device": "cpu"}
    assert on_device.settings["fit_device"]["provider"] == "CUDAExecutionProvider"
    for host, device in zip(on_host.layers, on_device.layers):
        assert device.l2 == host.l2
        assert abs(device.metrics["test"].error - host.metrics["test"].error) <= 0.001 + 1e-12, host.name
