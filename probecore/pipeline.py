"""The whole probing run on any activation source: extract and reduce batch by batch, then fit per layer."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from .datasets import Dataset, fingerprint
from .feature_cache import FeatureCache
from .layers import probed_parents, select_layers
from .control import control_labels
from .probe import FitOptions, Probe, fit_probes
from .errors import CacheError, DataError, Interrupted, LayerSelectionError, ReductionError
from .reduction import Reduction, ReductionPolicy, plan_reduction
from .report import LayerResult, ProbeReport
from .softmax import SplitMetrics
from .source import ActivationSource, LayerInfo, ReducingSource

# progress(stage, completed, total, detail): stage is "extract" (samples), "fit" or "control" (layers).
ProgressCallback = Callable[[str, int, int, str], None]
RECORDED_PACKAGES = ("probecore", "numpy", "scipy", "numba", "onnx", "onnxruntime", "onnxruntime-gpu")


@dataclass
class ExtractedFeatures:
    """Reduced features of every chosen layer for every split, and the model's own test scores if any."""

    by_layer: dict[str, dict[str, np.ndarray]]  # layer -> split -> (N, features) float32
    reductions: dict[str, Reduction]
    model_output: str | None = None  # the model output that scores the same classes, if any
    model_test_scores: np.ndarray | None = None  # (N_test, C) from that output
    reduced_in: dict[str, str] = dataclasses.field(default_factory=dict)  # layer -> "model" (the source, e.g. the
    # ONNX graph on the model's device, reduced it) or "host" (the numba kernels did, after it left the source)
    cached: bool = False  # True when the features went through the cache (a source without identity skips it)
    splits_from_cache: int = 0  # split entries (a split, or a split's group of layers) read whole from the cache

    @property
    def reduced_by_source(self) -> bool:
        """True when the source reduced every layer itself: only reduced features left it."""
        return all(where == "model" for where in self.reduced_in.values())


def run_probes(
    source: ActivationSource,
    dataset: Dataset,
    layers: Sequence[str] | None = None,
    policy: ReductionPolicy = ReductionPolicy(),
    fit: FitOptions = FitOptions(),
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
    cache: FeatureCache | None = None,
    layers_per_pass: int | None = None,
    control_task: bool = False,
) -> ProbeReport:
    """Fit one probe per chosen layer of ``source`` on ``dataset`` and measure it on every split.

    ``layers`` takes entries as ``select_layers`` does (names, globs, ``op:Type``); None probes the source's
    default layers. Activations are reduced as they arrive, so only reduced features are ever held whole;
    with a ``cache`` they are kept on disk and reused by later runs (see ``extract_features``). Layers are
    fitted ``fit.threads`` at a time. ``control_task`` also fits each layer a probe on control labels
    (``control.py``) at the strength its real probe chose, and reports selectivity.
    """
    started = time.perf_counter()
    progress = progress or (lambda *args: None)
    inputs = checked_inputs(source, dataset)  # first: a model's open input sizes are fixed from the data here
    chosen = select_layers(source.layers(), layers)
    extracted = _extract(source, dataset, inputs, chosen, policy, batch_size, progress, cache, layers_per_pass)
    extract_seconds = time.perf_counter() - started
    with _kept_in_cache(cache if extracted.cached else None):
        results, fit_seconds = _fit_and_score(dataset, chosen, extracted, fit, control_task, progress)
    parents = probed_parents(source.layers(), chosen)
    for layer, result in zip(chosen, results):  # where each layer sits in the model, for the diagnostics
        result.role, result.parents = layer.role, parents[layer.name]

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
        "layers_per_pass": layers_per_pass,
        "reduced_by_source": extracted.reduced_by_source,
        "cache": None
        if not extracted.cached
        else {"dir": str(cache.root), "storage": cache.storage_dtype, "splits_from_cache": extracted.splits_from_cache},
        "control_task": control_task,
        "seconds": {
            "extract": round(extract_seconds, 3),
            "fit": round(fit_seconds, 3),
            "total": round(time.perf_counter() - started, 3),
        },
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


def _fit_and_score(dataset, layers, extracted, fit, control_task, progress) -> tuple[list[LayerResult], float]:
    """Fit every layer's probe (and control probe) on the extracted features; score them on every split."""
    started = time.perf_counter()
    n_classes = len(dataset.classes)
    features = extracted.by_layer
    counts = {name: activation_counts(features[name]) for name in features}  # NaN/Inf set to 0 here
    probes = _fit_layers(features, dataset.train.y, dataset.valid.y, n_classes, fit, progress, "fit")
    controls = {}
    if control_task:
        labels = control_labels(dataset)
        by_strength: dict[float, list[str]] = {}
        for name, probe in probes.items():
            by_strength.setdefault(probe.l2, []).append(name)
        for l2, names in by_strength.items():  # each control probe as its real one: same strength
            chosen_fit = dataclasses.replace(fit, l2=l2)
            group = {name: features[name] for name in names}
            fitted = _fit_layers(group, labels["train"], labels["valid"], n_classes, chosen_fit, progress, "control")
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


def extract_features(
    source: ActivationSource,
    dataset: Dataset,
    layers: Sequence[LayerInfo],
    policy: ReductionPolicy = ReductionPolicy(),
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
    cache: FeatureCache | None = None,
    layers_per_pass: int | None = None,
) -> ExtractedFeatures:
    """Run ``source`` over every split, reducing each batch of each layer as it arrives.

    Every input is checked and every layer's reduction planned before the first forward pass, so mistakes
    surface before any work is done (a layer whose shape the source cannot tell is measured on one sample).
    With a ``cache``, each split's features go to disk batch by batch (memory stays flat in the number of
    samples), a split already cached runs no forward pass, and an interrupted split resumes from its last
    completed batch. ``layers_per_pass`` exposes at most that many layers per forward pass (more passes,
    less memory per pass).
    """
    inputs = checked_inputs(source, dataset)
    return _extract(source, dataset, inputs, layers, policy, batch_size, progress, cache, layers_per_pass)


def checked_inputs(source: ActivationSource, dataset: Dataset) -> dict:
    """Each split's inputs as ``source.check_inputs`` returns them; the splits must share one per-sample shape."""
    inputs = {name: source.check_inputs(split.x) for name, split in dataset.splits().items()}
    shapes = {name: _sample_shape(x) for name, x in inputs.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise DataError(f"the splits' samples differ in shape ({listed}); give every split samples of one shape")
    return inputs


def _sample_shape(x) -> tuple:
    """Per-sample shape of an array, or of each field of a structured one (a model with several inputs)."""
    if x.dtype.names:
        return tuple((name, x.dtype[name].shape) for name in x.dtype.names)
    return tuple(x.shape[1:])


def _extract(
    source, dataset, inputs, layers, policy, batch_size, progress, cache, layers_per_pass
) -> ExtractedFeatures:
    if layers_per_pass is not None and layers_per_pass < 1:
        raise ReductionError(f"layers_per_pass must be at least 1, got {layers_per_pass}")
    if not layers:
        raise LayerSelectionError("no layers to extract; pass at least one (see source.layers())")
    progress = progress or (lambda *args: None)
    layers = _with_shapes(source, layers, inputs["train"])
    mask_input = getattr(source, "mask_input", None)  # the model input marking real tokens, if any
    reductions = {
        layer.name: plan_reduction(layer.name, layer.shape, policy, layout=layer.layout, mask_input=mask_input)
        for layer in layers
    }
    model_output = _output_predicting(source.layers(), dataset.classes)
    names = [layer.name for layer in layers]
    # A source that reduces by itself (in the model's graph, on its device) ships only reduced features.
    by_source = isinstance(source, ReducingSource)
    reduced_in = {name: "model" if by_source and source.can_reduce(reductions[name]) else "host" for name in names}
    identity = source.identity() if cache is not None else None
    cached = identity is not None
    extracted = ExtractedFeatures({name: {} for name in names}, reductions, reduced_in=reduced_in, cached=cached)
    data_keys = {name: _data_key(x) for name, x in inputs.items()} if extracted.cached else {}  # hashed once per split
    step = layers_per_pass or len(names)
    groups = [names[start : start + step] for start in range(0, len(names), step)]
    total_samples, done = len(groups) * sum(len(x) for x in inputs.values()), 0
    for index, group in enumerate(groups):
        for split_name, x in inputs.items():
            scores = model_output if split_name == "test" and index == 0 else None
            batches = _reduced_batches(source, group, reductions, scores, reduced_in, batch_size)

            def report(n_done: int, split_name=split_name, offset=done) -> None:
                progress("extract", offset + n_done, total_samples, split_name)

            if extracted.cached:
                key = _cache_key(identity, data_keys[split_name], group, reductions, scores)
                with _kept_in_cache(cache):
                    arrays, from_cache = _through_cache(cache, key, x, batches, report)
                extracted.splits_from_cache += from_cache
            else:
                arrays = _in_memory(x, batches, report)
            done += len(x)
            for name in group:
                extracted.by_layer[name][split_name] = arrays[name]
            if scores is not None:
                extracted.model_output, extracted.model_test_scores = scores.name, np.asarray(arrays[SCORES], np.float32)
    return extracted


def _with_shapes(source: ActivationSource, layers: Sequence[LayerInfo], x) -> list[LayerInfo]:
    """``layers`` as the source describes them now (its input sizes may have been fixed from the data since
    they were chosen), each with its per-sample shape: one that no inference could tell is measured on the
    first sample, so that every layer is planned, reduced by the source and cached like the others."""
    current = {layer.name: layer for layer in source.layers()}
    layers = [current.get(layer.name, layer) for layer in layers]
    unknown = [layer.name for layer in layers if layer.n_features is None]
    if not unknown:
        return layers
    measured = next(iter(source.activations(x[:1], unknown, 1)))
    return [
        dataclasses.replace(layer, shape=tuple(measured[layer.name].shape[1:])) if layer.name in unknown else layer
        for layer in layers
    ]


@contextlib.contextmanager
def _kept_in_cache(cache: FeatureCache | None):
    """Ctrl-C with a cache in use says where the features extracted so far are kept for the next run."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if cache is None or isinstance(exc, Interrupted):
            raise
        raise Interrupted(
            f"the features extracted so far are kept in the cache ({cache.root}); the same command resumes there"
        ) from None


SCORES = "::model_output"  # the model's own output, stored beside the layers for the test split


def _reduced_batches(source, names, reductions, scores, reduced_in, batch_size):
    """A function of inputs ``x`` yielding, per batch, every layer's reduced (B, k) float32 features: those the
    source reduces itself come reduced, the others whole, reduced here."""
    in_model = {name: reductions[name] for name in names if reduced_in[name] == "model"}
    on_host = [name for name in names if name not in in_model]
    extra = [scores.name] if scores is not None and scores.name not in names else []
    masks = {reductions[name].mask_input for name in on_host} - {None} - set(names)
    extra += sorted(masks)  # token pooling on the host skips padding

    def run(x):
        if in_model:
            stream = source.reduced_activations(x, in_model, batch_size, [*on_host, *extra])
        else:
            stream = source.activations(x, [*names, *extra], batch_size)
        for batch in stream:
            reduced = {}
            for name in names:
                values = batch[name]
                if name not in in_model:
                    values = reductions[name].apply(values, batch.get(reductions[name].mask_input))
                reduced[name] = values
            if scores is not None:
                n_batch = len(reduced[names[0]])
                reduced[SCORES] = np.asarray(batch[scores.name], np.float32).reshape(n_batch, -1)
            yield reduced

    return run


def _in_memory(x, batches, report) -> dict[str, np.ndarray]:
    """Each layer's features for the split, every batch copied into one array made at the first batch: batches
    are not kept until the end (they sit in onnxruntime's memory pool, which is not given back: holding them
    all cost 52 KiB a sample on top of the features, benchmarks/README.md)."""
    features: dict[str, np.ndarray] = {}
    n_done = 0
    for batch in batches(x):
        for name, values in batch.items():
            if name not in features:
                features[name] = np.empty((len(x), *values.shape[1:]), values.dtype)
            features[name][n_done : n_done + len(values)] = values
        n_done += len(next(iter(batch.values())))
        report(n_done)
    return {name: values[:n_done] for name, values in features.items()}


def _through_cache(cache: FeatureCache, key: dict, x, batches, report) -> tuple[dict[str, np.ndarray], bool]:
    """Fill the cache entry for ``key`` from where it stopped (if it is not complete), then read it.

    An interrupted run (Ctrl-C, kill -9) leaves the entry to be resumed; a run that fails (the model, the
    data, a full disk) removes it, so nothing it wrote outlives it."""
    widths = {name: int(width) for name, width in key["widths"].items()}
    with cache.open(key, len(x), widths) as entry:
        from_cache = entry.complete
        start = entry.completed
        report(start)
        try:
            for batch in [] if entry.complete else batches(_rows_from(x, start)):
                entry.write(start, batch)
                start += len(next(iter(batch.values())))
                report(start)
        except KeyboardInterrupt:
            raise  # the entry stays, to be resumed
        except Exception as exc:
            entry.discard()
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(
                    f"out of disk space writing the feature cache in {cache.root} (the partial entry was removed); "
                    "free some space, pass --cache-dir on another disk, or --no-cache"
                ) from None
            raise
        return entry.read(), from_cache


def _data_key(x) -> str:
    """A fingerprint of the inputs: lazy ones (image folders) hash their files and preprocessing themselves."""
    return x.fingerprint() if hasattr(x, "fingerprint") else fingerprint(x)


def _cache_key(identity: dict, data: str, names, reductions, scores) -> dict:
    """Everything that fixes a split's features: model, inputs (and their preprocessing), reductions."""
    layers = {name: reductions[name].key() for name in names}
    widths = {name: reductions[name].n_features_out for name in names}
    if scores is not None:
        widths[SCORES] = scores.n_features
    return {"format": 1, "source": identity, "data": data, "layers": layers, "widths": widths}


def _rows_from(x, start: int):
    """``x`` from row ``start`` on, without loading anything for lazy inputs (which offer ``subset``)."""
    if start == 0:
        return x
    return x.subset(np.arange(start, len(x))) if hasattr(x, "subset") else x[start:]


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


def _output_predicting(available: Sequence[LayerInfo], classes: np.ndarray) -> LayerInfo | None:
    """The model output that scores exactly these classes (integer labels 0..C-1), if there is one."""
    n_classes = len(classes)
    if classes.dtype.kind not in "iu" or not np.array_equal(classes, np.arange(n_classes)):
        return None
    for layer in available:
        if layer.is_output and layer.shape == (n_classes,):
            return layer
    return None


def _fit_layers(features, train_labels, valid_labels, n_classes, fit, progress, stage) -> dict[str, Probe]:
    """``fit_probes`` over every layer of ``features`` (layer -> split -> array), reporting progress."""
    names = list(features)
    finished = []
    progress(stage, 0, len(names), "")

    def done(name: str, probe: Probe) -> None:
        finished.append(name)
        progress(stage, len(finished), len(names), name)

    train = {name: features[name]["train"] for name in names}
    valid = {name: features[name]["valid"] for name in names}
    return fit_probes(train, train_labels, n_classes, valid, valid_labels, fit, done)


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
