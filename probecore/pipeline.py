"""The whole probing run on any activation source: extract and reduce batch by batch, then fit per layer."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from .datasets import Dataset
from .layers import select_layers
from .probe import FitOptions, fit_probe
from .reduction import Reduction, ReductionPolicy, plan_reduction
from .report import LayerResult, ProbeReport
from .softmax import SplitMetrics
from .source import ActivationSource, LayerInfo, ReducingSource

# progress(stage, completed, total, detail): stage is "extract" (samples) or "fit" (layers).
ProgressCallback = Callable[[str, int, int, str], None]
RECORDED_PACKAGES = ("probecore", "numpy", "scipy", "numba", "onnx", "onnxruntime", "onnxruntime-gpu")


@dataclass
class ExtractedFeatures:
    """Reduced features of every chosen layer for every split, and the model's own test scores if any."""

    by_layer: dict[str, dict[str, np.ndarray]]  # layer -> split -> (N, features) float32
    reductions: dict[str, Reduction]
    model_output: str | None = None  # the model output that scores the same classes, if any
    model_test_scores: np.ndarray | None = None  # (N_test, C) from that output
    reduced_by_source: bool = False  # True when the source reduced the layers itself (e.g. in the ONNX graph)


def run_probes(
    source: ActivationSource,
    dataset: Dataset,
    layers: Sequence[str] | None = None,
    policy: ReductionPolicy = ReductionPolicy(),
    fit: FitOptions = FitOptions(),
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> ProbeReport:
    """Fit one probe per chosen layer of ``source`` on ``dataset`` and measure it on every split.

    ``layers`` takes entries as ``select_layers`` does (names, globs, ``op:Type``); None probes the source's
    default layers. Activations are reduced as they arrive, so only reduced features are ever held whole.
    """
    started = time.perf_counter()
    progress = progress or (lambda *args: None)
    chosen = select_layers(source.layers(), layers)
    extracted = extract_features(source, dataset, chosen, policy, batch_size, progress)
    extract_seconds = time.perf_counter() - started

    results = []
    n_classes = len(dataset.classes)
    for index, layer in enumerate(chosen):
        progress("fit", index, len(chosen), layer.name)
        by_split = extracted.by_layer.pop(layer.name)  # free each layer's features once fitted
        probe = fit_probe(by_split["train"], dataset.train.y, n_classes, by_split["valid"], dataset.valid.y, fit)
        metrics = {name: probe.evaluate(by_split[name], split.y) for name, split in dataset.splits().items()}
        results.append(_layer_result(layer, extracted.reductions[layer.name], metrics, probe))
    progress("fit", len(chosen), len(chosen), "")

    model_test = None
    if extracted.model_test_scores is not None:
        predicted = extracted.model_test_scores.argmax(axis=1)
        model_test = SplitMetrics(len(predicted), None, float(np.mean(predicted != dataset.test.y)), None)
    settings = {
        "source": source.describe(),
        "layers_requested": list(layers) if layers else None,
        "reduction": {**vars(policy)},
        "fit": {**vars(fit)},
        "batch_size": batch_size,
        "reduced_by_source": extracted.reduced_by_source,
        "seconds": {"extract": round(extract_seconds, 3), "total": round(time.perf_counter() - started, 3)},
        "versions": {"python": platform.python_version(), **_package_versions()},
    }
    return ProbeReport(
        layers=results,
        classes=[c.item() if hasattr(c, "item") else c for c in dataset.classes],
        split_sizes={name: len(split) for name, split in dataset.splits().items()},
        model_test=model_test,
        model_output=extracted.model_output if model_test is not None else None,
        settings=settings,
    )


def extract_features(
    source: ActivationSource,
    dataset: Dataset,
    layers: Sequence[LayerInfo],
    policy: ReductionPolicy = ReductionPolicy(),
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> ExtractedFeatures:
    """Run ``source`` over every split, reducing each batch of each layer as it arrives.

    Every input is checked before the first forward pass, and layers of known shape get their reduction
    planned up front, so mistakes surface before any work is done.
    """
    progress = progress or (lambda *args: None)
    inputs = {name: source.check_inputs(split.x) for name, split in dataset.splits().items()}
    reductions = {layer.name: plan_reduction(layer.name, layer.shape, policy) for layer in layers if layer.n_features}
    model_output = _output_predicting(source.layers(), dataset.classes)
    names = [layer.name for layer in layers]
    by_layer = {name: {} for name in names}
    model_test_scores = None
    total_samples, done = sum(len(x) for x in inputs.values()), 0
    # A source that reduces by itself (in the model's graph, on its device) ships only reduced features.
    by_source = isinstance(source, ReducingSource) and all(
        name in reductions and source.can_reduce(reductions[name]) for name in names
    )
    for split_name, x in inputs.items():
        score_output = model_output is not None and split_name == "test"
        extra = [model_output.name] if score_output and model_output.name not in names else []
        if by_source:
            stream = source.reduced_activations(x, {name: reductions[name] for name in names}, batch_size, extra)
        else:
            stream = source.activations(x, [*names, *extra], batch_size)
        parts_by_layer = {name: [] for name in names}
        score_parts = []
        for batch in stream:
            for name in names:
                values = batch[name]
                if not by_source:
                    if name not in reductions:  # shape known only now
                        reductions[name] = plan_reduction(name, values.shape[1:], policy)
                    values = reductions[name].apply(values)
                parts_by_layer[name].append(values)
            n_batch = len(next(iter(batch.values())))
            if score_output:
                score_parts.append(np.asarray(batch[model_output.name], np.float32).reshape(n_batch, -1))
            done += n_batch
            progress("extract", done, total_samples, split_name)
        for name, parts in parts_by_layer.items():
            by_layer[name][split_name] = np.concatenate(parts)
        if score_parts:
            model_test_scores = np.concatenate(score_parts)
    output_name = None if model_output is None else model_output.name
    return ExtractedFeatures(by_layer, reductions, output_name, model_test_scores, by_source)


def _output_predicting(available: Sequence[LayerInfo], classes: np.ndarray) -> LayerInfo | None:
    """The model output that scores exactly these classes (integer labels 0..C-1), if there is one."""
    n_classes = len(classes)
    if classes.dtype.kind not in "iu" or not np.array_equal(classes, np.arange(n_classes)):
        return None
    for layer in available:
        if layer.is_output and layer.shape == (n_classes,):
            return layer
    return None


def _layer_result(layer: LayerInfo, reduction: Reduction, metrics, probe) -> LayerResult:
    return LayerResult(
        name=layer.name,
        op_type=layer.op_type,
        shape=reduction.sample_shape,
        reduction=reduction.to_dict(),
        metrics=metrics,
        n_iter=probe.n_iter,
        stop_reason=probe.stop_reason,
        fit_seconds=probe.fit_seconds,
    )


def _package_versions() -> dict[str, str]:
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
