"""The whole probing run, in four steps: plan (inputs checked, layers chosen, reductions planned), extract
(``extraction.py``, run by an engine), fit (by the same engine), report."""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from collections.abc import Sequence
from importlib import metadata

import numpy as np

from .control import control_labels
from .datasets import Dataset
from .engine import Engine, LocalEngine
from .errors import ProbeError
from .extraction import ProgressCallback, checked_inputs, kept_in_cache, plan_extraction
from .layers import probed_parents, select_layers
from .probe import Probe
from .reduction import Reduction
from .report import LayerResult, ProbeReport
from .run_spec import RunSpec
from .softmax import EvaluatorFactory, SplitMetrics
from .source import ActivationSource, LayerInfo

RECORDED_PACKAGES = ("probecore", "numpy", "scipy", "numba", "onnx", "onnxruntime", "onnxruntime-gpu")


def run_probes(
    source: ActivationSource,
    dataset: Dataset,
    spec: RunSpec = RunSpec(),
    progress: ProgressCallback | None = None,
    engine: Engine | None = None,
) -> ProbeReport:
    """Fit one probe per chosen layer of ``source`` on ``dataset`` and measure it on every split.

    ``spec`` says which layers, how they are reduced and fitted, and whether features are cached (see
    ``RunSpec``). Activations are reduced as they arrive, so only reduced features are ever held whole.
    ``engine`` runs extraction and fitting (default: ``LocalEngine``, this process); the report is the same
    whichever runs them. ``progress(stage, done, total, detail)`` is told how far each stage has got.
    """
    started = time.perf_counter()
    progress = progress or (lambda *args: None)
    engine = engine or LocalEngine()
    inputs = checked_inputs(source, dataset)  # first: a model's open input sizes are fixed from the data here
    chosen = select_layers(source.layers(), spec.layers)
    plan = plan_extraction(source, inputs, chosen, spec, dataset.classes)
    evaluator = loss_evaluator(source, spec.fit_device, engine)  # before extracting: "cuda" may be refused
    extracted = engine.extract(source, plan, progress)
    extract_seconds = time.perf_counter() - started
    with kept_in_cache(plan.cache):
        results, fit_seconds = _fit_and_score(engine, dataset, chosen, extracted, spec, progress, evaluator)
    parents = probed_parents(source.layers(), chosen)
    for layer, result in zip(chosen, results):  # where each layer sits in the model, for the diagnostics
        result.role, result.parents = layer.role, parents[layer.name]
    seconds = {"extract": extract_seconds, "fit": fit_seconds, "total": time.perf_counter() - started}
    fitted_on = getattr(evaluator, "describe", lambda: {"device": "cpu"})()
    return _report(source, dataset, spec, engine, plan.cache, extracted, results, seconds, fitted_on)


def loss_evaluator(source: ActivationSource, fit_device: str, engine: Engine) -> EvaluatorFactory | None:
    """What evaluates the probes' losses as ``fit_device`` asks (``RunSpec``): None for the host's
    ``SoftmaxLoss``, else the GPU fitter a source offers (``loss_evaluator(fit_device)``, as ``OnnxSource``
    does), which decides "auto" and refuses "cuda" where it cannot. Only an engine fitting in this process
    uses one."""
    if fit_device == "cpu":
        return None
    offer = getattr(source, "loss_evaluator", None)
    if not isinstance(engine, LocalEngine):
        why = "the Ray engine fits probes on its workers' CPUs"
    elif offer is None:
        why = f"{type(source).__name__} offers no GPU fitter (an ONNX model's OnnxSource does)"
    else:
        return offer(fit_device)
    if fit_device == "cuda":
        raise ProbeError(f"--fit-device cuda was asked for, but {why}; use --fit-device auto or cpu")
    return None


def _report(source, dataset, spec, engine, cache, extracted, results, seconds, fitted_on) -> ProbeReport:
    model_test = None
    if extracted.model_test_scores is not None:
        predicted = extracted.model_test_scores.argmax(axis=1)
        model_test = SplitMetrics(len(predicted), None, float(np.mean(predicted != dataset.test.y)), None)
    settings = {
        "source": source.describe(),
        "spec": spec.to_dict(),
        "engine": engine.describe(),
        "fit_device": fitted_on,
        "reduced_by_source": extracted.reduced_by_source,
        "cache": None
        if cache is None
        else {"dir": str(cache.root), "storage": cache.storage_dtype, "splits_from_cache": extracted.splits_from_cache},
        "seconds": {stage: round(value, 3) for stage, value in seconds.items()},
        "versions": {"python": platform.python_version(), **package_versions()},
    }
    return ProbeReport(
        layers=results,
        classes=[c.item() if hasattr(c, "item") else c for c in dataset.classes],
        split_sizes={name: len(split) for name, split in dataset.splits().items()},
        model_test=model_test,
        model_output=extracted.model_output if model_test is not None else None,
        settings=settings,
    )


def _fit_and_score(engine, dataset, layers, extracted, spec, progress, evaluator) -> tuple[list[LayerResult], float]:
    """Fit every layer's probe (and control probe) on the extracted features; score them on every split."""
    started, fit = time.perf_counter(), spec.fit
    n_classes = len(dataset.classes)
    features = extracted.by_layer
    counts = {name: activation_counts(features[name]) for name in features}  # NaN/Inf set to 0 here
    fit_layers = functools.partial(_fit_layers, engine, progress=progress, evaluator=evaluator)
    probes = fit_layers(features, dataset.train.y, dataset.valid.y, n_classes, fit, stage="fit")
    controls = {}
    if spec.control_task:
        labels = control_labels(dataset)
        by_strength: dict[float, list[str]] = {}
        for name, probe in probes.items():
            by_strength.setdefault(probe.l2, []).append(name)
        for l2, names in by_strength.items():  # each control probe as its real one: same strength
            chosen_fit = dataclasses.replace(fit, l2=l2)
            group = {name: features[name] for name in names}
            fitted = fit_layers(group, labels["train"], labels["valid"], n_classes, chosen_fit, stage="control")
            controls.update(
                {name: {split: probe.evaluate(group[name][split], labels[split]) for split in labels}
                 for name, probe in fitted.items()}
            )  # fmt: skip
    results = []
    for layer in layers:
        probe, by_split = probes[layer.name], features[layer.name]
        metrics = {name: probe.evaluate(by_split[name], split.y) for name, split in dataset.splits().items()}
        result = _layer_result(layer, extracted.reductions[layer.name], metrics, probe, controls.get(layer.name))
        result.reduction["reduced_in"] = extracted.reduced_in[layer.name]
        result.activations = counts[layer.name]
        results.append(result)
    return results, time.perf_counter() - started


def activation_counts(by_split: dict[str, np.ndarray]) -> dict:
    """Count NaN/Inf values (and the samples holding them) over every split and replace them by 0, so one
    damaged layer is reported rather than stopping the run; count the features constant on the training
    split. Arrays with non-finite values are replaced by cleaned copies (cached ones are read-only)."""
    values, samples = 0, 0
    for split, array in by_split.items():
        bad = ~np.isfinite(array)
        if bad.any():
            values += int(bad.sum())
            samples += int(bad.any(axis=1).sum())
            by_split[split] = np.where(bad, np.float32(0), array).astype(array.dtype)
    train = by_split["train"]
    constant = int(np.sum(train.min(axis=0) == train.max(axis=0))) if len(train) else 0
    return {"non_finite_values": values, "samples_with_non_finite": samples, "constant_features": constant,
            "features": int(train.shape[1])}  # fmt: skip


def _fit_layers(engine, features, train_labels, valid_labels, n_classes, fit, *, progress, stage, evaluator):
    """``engine.fit`` over every layer of ``features`` (layer -> split -> array), reporting progress."""
    names = list(features)
    finished = []
    progress(stage, 0, len(names), "")

    def done(name: str, probe: Probe) -> None:
        finished.append(name)
        progress(stage, len(finished), len(names), name)

    train = {name: features[name]["train"] for name in names}
    valid = {name: features[name]["valid"] for name in names}
    return engine.fit(train, train_labels, n_classes, valid, valid_labels, fit, done, evaluator)


def _layer_result(layer: LayerInfo, reduction: Reduction, metrics, probe: Probe, control) -> LayerResult:
    return LayerResult(
        name=layer.name,
        op_type=layer.op_type,
        shape=reduction.sample_shape,
        reduction=reduction.to_dict(),
        metrics=metrics,
        n_iter=probe.n_iter,
        stop_reason=probe.stop_reason,
        fit_seconds=probe.fit_seconds,
        l2=probe.l2,
        l2_path=[point.to_dict() for point in probe.path],
        control=control,
    )


def package_versions(packages: Sequence[str] = RECORDED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages``, skipping those not installed (e.g. onnxruntime vs onnxruntime-gpu)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
