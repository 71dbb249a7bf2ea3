"""Extraction, planned then run: every chosen layer's reduced features for every split, through the cache.

``plan_extraction`` settles everything before the first forward pass (inputs checked, shapes known,
reductions planned, cache keys made), so mistakes surface before any work is done and an engine
(``engine.py``) can run the plan where it likes; ``run_extraction`` runs it here, batch by batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .datasets import Dataset, fingerprint
from .errors import CacheError, DataError, Interrupted, LayerSelectionError
from .feature_cache import FeatureCache
from .reduction import Reduction, plan_reduction
from .run_spec import RunSpec
from .source import ActivationSource, LayerInfo, ReducingSource

# progress(stage, completed, total, detail): stage is "extract" (samples), "fit" or "control" (layers).
ProgressCallback = Callable[[str, int, int, str], None]
SCORES = "::model_output"  # the model's own output, stored beside the layers for the test split


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


@dataclass
class ExtractionPlan:
    """What extraction does, settled before any forward pass: one *task* per group of layers and split."""

    inputs: dict  # split -> inputs as the source checked them
    layers: list[LayerInfo]  # with their per-sample shapes
    reductions: dict[str, Reduction]
    reduced_in: dict[str, str]  # layer -> "model" or "host" (see ExtractedFeatures)
    model_output: LayerInfo | None  # the output scoring the dataset's classes, fetched with the first group's test
    groups: list[list[str]]  # layer names exposed together in one pass over the data
    batch_size: int
    cache: FeatureCache | None  # None also when the source has no identity
    cache_keys: dict[tuple[int, str], dict]  # (group index, split) -> cache key, when cached

    def tasks(self) -> list[tuple[int, str]]:
        """(group index, split) in the order they run."""
        return [(index, split) for index in range(len(self.groups)) for split in self.inputs]

    def scores_for(self, index: int, split: str) -> LayerInfo | None:
        return self.model_output if split == "test" and index == 0 else None

    @property
    def total_samples(self) -> int:
        return len(self.groups) * sum(len(x) for x in self.inputs.values())


def extract_features(
    source: ActivationSource,
    dataset: Dataset,
    layers: Sequence[LayerInfo],
    spec: RunSpec = RunSpec(),
    progress: ProgressCallback | None = None,
) -> ExtractedFeatures:
    """Run ``source`` over every split, reducing each batch of each layer as it arrives (``spec`` gives the
    reductions, batch size, cache and layers per pass; its ``layers`` are not used: ``layers`` are).

    With a cache, each split's features go to disk batch by batch (memory stays flat in the number of
    samples), a split already cached runs no forward pass, and an interrupted split resumes from its last
    completed batch."""
    plan = plan_extraction(source, checked_inputs(source, dataset), layers, spec, dataset.classes)
    return run_extraction(source, plan, progress)


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


def plan_extraction(
    source: ActivationSource, inputs: dict, layers: Sequence[LayerInfo], spec: RunSpec, classes: np.ndarray
) -> ExtractionPlan:
    """Shapes, reductions, where each layer is reduced, layer groups and cache keys, before any forward pass
    (a layer whose shape the source cannot tell is measured on one sample)."""
    if not layers:
        raise LayerSelectionError("no layers to extract; pass at least one (see source.layers())")
    layers = _with_shapes(source, layers, inputs["train"])
    mask_input = getattr(source, "mask_input", None)  # the model input marking real tokens, if any
    reductions = {
        layer.name: plan_reduction(layer.name, layer.shape, spec.policy, layout=layer.layout, mask_input=mask_input)
        for layer in layers
    }
    names = [layer.name for layer in layers]
    # A source that reduces by itself (in the model's graph, on its device) ships only reduced features.
    by_source = isinstance(source, ReducingSource)
    reduced_in = {name: "model" if by_source and source.can_reduce(reductions[name]) else "host" for name in names}
    step = spec.layers_per_pass or len(names)
    plan = ExtractionPlan(
        inputs, layers, reductions, reduced_in, _output_predicting(source.layers(), classes),
        [names[start : start + step] for start in range(0, len(names), step)], spec.batch_size, None, {},
    )  # fmt: skip
    cache = spec.feature_cache()
    identity = source.identity() if cache is not None else None
    if identity is not None:
        data_keys = {name: _data_key(x) for name, x in inputs.items()}  # hashed once per split
        plan.cache = cache
        plan.cache_keys = {
            (index, split): _cache_key(identity, data_keys[split], plan.groups[index], reductions, plan.scores_for(index, split))
            for index, split in plan.tasks()
        }  # fmt: skip
    return plan


def run_extraction(source: ActivationSource, plan: ExtractionPlan, progress: ProgressCallback | None = None) -> ExtractedFeatures:
    """Run every task of ``plan`` here, one after the other."""
    progress = progress or (lambda *args: None)
    extracted = empty_features(plan)
    done = 0
    for index, split in plan.tasks():
        x = plan.inputs[split]
        batches = reduced_batches(source, plan, index, split)

        def report(n_done: int, split=split, offset=done) -> None:
            progress("extract", offset + n_done, plan.total_samples, split)

        if plan.cache is not None:
            with kept_in_cache(plan.cache):
                arrays, from_cache = through_cache(plan.cache, plan.cache_keys[index, split], x, batches, report)
            extracted.splits_from_cache += from_cache
        else:
            arrays = _in_memory(x, batches, report)
        done += len(x)
        add_task_result(extracted, plan, index, split, arrays)
    return extracted


def empty_features(plan: ExtractionPlan) -> ExtractedFeatures:
    """The result to fill, task by task, with ``add_task_result``."""
    names = [layer.name for layer in plan.layers]
    return ExtractedFeatures(
        {name: {} for name in names}, plan.reductions, reduced_in=plan.reduced_in, cached=plan.cache is not None
    )


def add_task_result(extracted: ExtractedFeatures, plan: ExtractionPlan, index: int, split: str, arrays: dict) -> None:
    for name in plan.groups[index]:
        extracted.by_layer[name][split] = arrays[name]
    scores = plan.scores_for(index, split)
    if scores is not None:
        extracted.model_output, extracted.model_test_scores = scores.name, np.asarray(arrays[SCORES], np.float32)


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
def kept_in_cache(cache: FeatureCache | None):
    """Ctrl-C with a cache in use says where the features extracted so far are kept for the next run."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if cache is None or isinstance(exc, Interrupted):
            raise
        raise Interrupted(
            f"the features extracted so far are kept in the cache ({cache.root}); the same command resumes there"
        ) from None


def reduced_batches(source: ActivationSource, plan: ExtractionPlan, index: int, split: str):
    """A function of inputs ``x`` yielding, per batch, every layer of group ``index``'s reduced (B, k) float32
    features (and the model's scores where ``split`` needs them): those the source reduces itself come
    reduced, the others whole, reduced here."""
    names, reductions, scores = plan.groups[index], plan.reductions, plan.scores_for(index, split)
    in_model = {name: reductions[name] for name in names if plan.reduced_in[name] == "model"}
    on_host = [name for name in names if name not in in_model]
    extra = [scores.name] if scores is not None and scores.name not in names else []
    masks = {reductions[name].mask_input for name in on_host} - {None} - set(names)
    extra += sorted(masks)  # token pooling on the host skips padding

    def run(x):
        if in_model:
            stream = source.reduced_activations(x, in_model, plan.batch_size, [*on_host, *extra])
        else:
            stream = source.activations(x, [*names, *extra], plan.batch_size)
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


def through_cache(cache: FeatureCache, key: dict, x, batches, report) -> tuple[dict[str, np.ndarray], bool]:
    """Fill the cache entry for ``key`` from where it stopped (if it is not complete), then read it.

    An interrupted run (Ctrl-C, kill -9) leaves the entry to be resumed; a run that fails (the model, the
    data, a full disk) removes it, so nothing it wrote outlives it."""
    widths = {name: int(width) for name, width in key["widths"].items()}
    with cache.open(key, len(x), widths) as entry:
        from_cache = entry.complete
        start = entry.completed
        report(start)
        try:
            for batch in [] if entry.complete else batches(rows_from(x, start)):
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


def rows_from(x, start: int, stop: int | None = None):
    """Rows ``start:stop`` of ``x``, without loading anything for lazy inputs (which offer ``subset``)."""
    stop = len(x) if stop is None else stop
    if start == 0 and stop == len(x):
        return x
    return x.subset(np.arange(start, stop)) if hasattr(x, "subset") else x[start:stop]


def _output_predicting(available: Sequence[LayerInfo], classes: np.ndarray) -> LayerInfo | None:
    """The model output that scores exactly these classes (integer labels 0..C-1), if there is one."""
    n_classes = len(classes)
    if classes.dtype.kind not in "iu" or not np.array_equal(classes, np.arange(n_classes)):
        return None
    for layer in available:
        if layer.is_output and layer.shape == (n_classes,):
            return layer
    return None
