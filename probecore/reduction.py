"""Which reduction each layer gets, and applying it to a batch (paper section 3.4).

A layer with more features than ``ReductionPolicy.max_features`` is reduced: spatial maps are pooled in
the smallest non-overlapping window that brings them under the limit (or globally, one value per channel),
sequences are pooled over their time axis, and whatever is still too large keeps a fixed random subset of
its features, drawn once per layer from the seed and reused for every batch and split.

Transformer activations, (N, T, D), can instead always be pooled to one vector per sequence
(``ReductionPolicy.tokens``): the mean or maximum over real tokens, the first token, or the last real token,
where "real" follows the attention mask the model takes (padding never counts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from .errors import ReductionError

POOL_KINDS = ("avg", "max")
TOKEN_POOLS = ("mean", "max", "first", "last")
LAYOUTS = ("flat", "sequence", "channels_first", "channels_last")
# Refused even when reduction is disabled: a probe this wide needs gigabytes for weights and features.
MAX_UNREDUCED_FEATURES = 1 << 18


@dataclass(frozen=True)
class ReductionPolicy:
    """How layers wider than ``max_features`` are reduced; the same policy applies to every layer of a run.

    ``global_pool`` pools each spatial map to one value per channel (the paper's ResNet-50 probes) instead of
    the smallest window that fits. ``channels_last`` reads rank-4 tensors as (N, H, W, C), as Keras makes them.
    ``enabled=False`` probes every layer whole (refusing ones above ``MAX_UNREDUCED_FEATURES``).
    ``tokens`` pools every sequence, (N, T, D), to (N, D) whatever its size: ``mean`` or ``max`` over real
    tokens, ``first`` token or ``last`` real token (a model's attention mask input says which are real).
    """

    max_features: int = 4096
    pool: str = "avg"
    global_pool: bool = False
    channels_last: bool = False
    enabled: bool = True
    seed: int = 0
    tokens: str | None = None

    def __post_init__(self):
        if self.max_features < 1:
            raise ReductionError(f"max_features must be at least 1, got {self.max_features}")
        if self.seed < 0:
            raise ReductionError(f"seed must be zero or positive, got {self.seed}")
        if self.pool not in POOL_KINDS:
            raise ReductionError(f"pool must be one of {', '.join(POOL_KINDS)}, got {self.pool!r}")
        if self.tokens is not None and self.tokens not in TOKEN_POOLS:
            raise ReductionError(f"tokens must be one of {', '.join(TOKEN_POOLS)}, got {self.tokens!r}")


@dataclass(frozen=True)
class Reduction:
    """The reduction planned for one layer: pooling (optional), then a column subset (optional).

    Sequences pooled by ``tokens`` (``mean``, ``max``, ``first``, ``last``) skip padding when ``apply`` is
    given the batch's token mask; ``mask_input`` names the model input it comes from."""

    layer: str
    sample_shape: tuple[int, ...]
    layout: str
    pool: str | None = None
    window: int | None = None
    subset: np.ndarray | None = field(default=None, repr=False)
    tokens: str | None = None
    mask_input: str | None = None

    @property
    def n_features_in(self) -> int:
        return math.prod(self.sample_shape)

    @property
    def pooled_shape(self) -> tuple[int, ...]:
        """Per-sample shape after pooling, before the subset."""
        if self.pool is None and self.tokens is None:
            return (self.n_features_in,)
        if self.layout == "sequence":
            return (self.sample_shape[1],)
        channels, height, width = _channels_height_width(self.sample_shape, self.layout)
        return (channels, -(-height // self.window), -(-width // self.window))

    @property
    def n_features_out(self) -> int:
        if self.subset is not None:
            return len(self.subset)
        return math.prod(self.pooled_shape)

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``avgpool 3x3 -> subset 4096``."""
        steps = []
        if self.tokens is not None:
            token = {"mean": "mean of", "max": "max of", "first": "first", "last": "last"}[self.tokens]
            steps.append(f"{token} {'real ' if self.mask_input and self.tokens != 'first' else ''}token"
                         f"{'s' if self.tokens in ('mean', 'max') else ''}")  # fmt: skip
        elif self.pool is not None:
            if self.layout == "sequence":
                steps.append(f"{self.pool}pool over time")
            elif self.pooled_shape[1:] == (1, 1):
                steps.append(f"global {self.pool}pool")
            else:
                steps.append(f"{self.pool}pool {self.window}x{self.window}")
        if self.subset is not None:
            steps.append(f"random {len(self.subset)} of {math.prod(self.pooled_shape)}")
        return " -> ".join(steps) if steps else "none"

    def to_dict(self) -> dict:
        return {
            "layout": self.layout,
            "pool": self.pool,
            "window": self.window,
            "tokens": self.tokens,
            "mask_input": self.mask_input,
            "subset_size": None if self.subset is None else len(self.subset),
            "features_in": self.n_features_in,
            "features_out": self.n_features_out,
            "description": self.describe(),
        }

    def key(self) -> dict:
        """Everything that fixes this reduction's output, subset indices included (as a hash): the one key
        for a cache entry's layer and for the onnxruntime session that computes it."""
        subset = None if self.subset is None else hashlib.sha256(self.subset.tobytes()).hexdigest()
        return {**self.to_dict(), "sample_shape": list(self.sample_shape), "subset_sha256": subset}

    def apply(self, batch: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Reduce one (N, *sample_shape) batch to (N, n_features_out) float32; ``mask``, (N, T), marks the
        real tokens of a sequence batch pooled by ``tokens`` (nonzero: real)."""
        if tuple(batch.shape[1:]) != self.sample_shape:
            raise ReductionError(
                f"layer {self.layer!r}: batch has per-sample shape {tuple(batch.shape[1:])}, "
                f"planned for {self.sample_shape}; the model's layer shapes must not change between batches"
            )
        n_samples = batch.shape[0]
        if batch.dtype not in (np.float32, np.float64):  # float16, bfloat16-as-float, ints: numba kernels need these
            batch = batch.astype(np.float32)
        if self.tokens is not None:
            features = pool_tokens(batch, self.tokens, mask)
        elif self.pool is not None:
            features = _pooled(self, batch)
        else:
            features = batch.reshape(n_samples, -1)
        features = features.reshape(n_samples, -1)
        if self.subset is not None:
            from . import kernels  # numba loads only when the host reduces (in-graph runs never need it)

            rows = np.ascontiguousarray(features)
            features = np.empty((n_samples, len(self.subset)), dtype=np.float32)
            kernels.gather_columns(rows, self.subset, features)
        return np.ascontiguousarray(features, dtype=np.float32)


def plan_reduction(
    layer: str, sample_shape: tuple[int, ...], policy: ReductionPolicy, layout: str | None = None,
    mask_input: str | None = None,
) -> Reduction:  # fmt: skip
    """Decide how ``layer``, whose samples have ``sample_shape``, is reduced under ``policy``.

    ``layout``: what the source knows of the layer (``channels_last`` for a Keras feature map), which wins
    over the policy's guess from the rank. ``mask_input``: the model input holding the token mask, if any."""
    sample_shape = tuple(int(d) for d in sample_shape)
    layout = _layout(sample_shape, policy, layout)
    n_features = math.prod(sample_shape)
    if layout == "sequence" and policy.tokens is not None:
        pooled = Reduction(layer, sample_shape, layout, tokens=policy.tokens, mask_input=mask_input)
        return _with_subset(pooled, policy)
    if not policy.enabled or n_features <= policy.max_features:
        if n_features > MAX_UNREDUCED_FEATURES:
            fix = "allow reduction (drop --no-reduce)" if not policy.enabled else "lower --max-features"
            raise ReductionError(
                f"layer {layer!r} has {n_features} features, more than the {MAX_UNREDUCED_FEATURES} that can "
                f"be probed unreduced; {fix} or choose other layers"
            )
        return Reduction(layer, sample_shape, layout)
    pool, window = None, None
    if layout == "sequence":
        pool = policy.pool
    elif layout in ("channels_first", "channels_last"):
        pool, window = policy.pool, _pool_window(sample_shape, layout, policy)
    return _with_subset(Reduction(layer, sample_shape, layout, pool, window), policy)


def _with_subset(reduction: Reduction, policy: ReductionPolicy) -> Reduction:
    """``reduction`` followed by a fixed random subset of its output when that is still too wide."""
    n_pooled = reduction.n_features_out
    if n_pooled <= policy.max_features or not policy.enabled:
        return reduction
    rng = np.random.default_rng([policy.seed, zlib.crc32(reduction.layer.encode())])
    subset = np.sort(rng.choice(n_pooled, size=policy.max_features, replace=False)).astype(np.int64)
    return dataclasses.replace(reduction, subset=subset)


def _layout(sample_shape: tuple[int, ...], policy: ReductionPolicy, hint: str | None = None) -> str:
    if hint in LAYOUTS and (hint == "flat" or len(sample_shape) == (2 if hint == "sequence" else 3)):
        return hint
    if len(sample_shape) == 3:
        return "channels_last" if policy.channels_last else "channels_first"
    if len(sample_shape) == 2:
        return "sequence"
    return "flat"


def _channels_height_width(sample_shape, layout):
    if layout == "channels_last":
        height, width, channels = sample_shape
    else:
        channels, height, width = sample_shape
    return channels, height, width


def _pool_window(sample_shape, layout, policy) -> int:
    """The smallest square window whose pooled output fits ``max_features`` (global if none does)."""
    channels, height, width = _channels_height_width(sample_shape, layout)
    largest = max(height, width)
    if policy.global_pool:
        return largest
    for window in range(2, largest):
        if channels * -(-height // window) * -(-width // window) <= policy.max_features:
            return window
    return largest


def _pooled(reduction: Reduction, batch: np.ndarray) -> np.ndarray:
    from . import kernels

    use_max = reduction.pool == "max"
    n_samples = batch.shape[0]
    if reduction.layout == "sequence":
        out = np.empty((n_samples, reduction.sample_shape[1]), dtype=np.float32)
        kernels.pool_sequence(batch, use_max, out)
        return out
    out = np.empty((n_samples, *reduction.pooled_shape), dtype=np.float32)
    if reduction.layout == "channels_last":
        kernels.pool2d_channels_last(batch, reduction.window, use_max, out)
    else:
        kernels.pool2d(batch, reduction.window, use_max, out)
    return out


def pool_tokens(batch: np.ndarray, how: str, mask: np.ndarray | None = None) -> np.ndarray:
    """Pool (N, T, D) token vectors to (N, D): ``mean`` or ``max`` over real tokens, the ``first`` token, or
    the ``last`` real one. ``mask`` (N, T): nonzero for real tokens; None: every token is real. Pooling the
    real tokens of a sequence that has none gives zeros."""
    n_samples, n_tokens, _ = batch.shape
    real = np.ones((n_samples, n_tokens), bool) if mask is None else np.asarray(mask).reshape(n_samples, n_tokens) != 0
    if how == "first":
        return np.asarray(batch[:, 0], np.float32)
    if how == "last":
        last = n_tokens - 1 - np.argmax(real[:, ::-1], axis=1)
        picked = np.asarray(batch[np.arange(n_samples), last], np.float32)
        return np.where(real.any(axis=1)[:, None], picked, np.float32(0))
    values = np.asarray(batch, np.float64)
    if how == "max":
        pooled = np.where(real[:, :, None], values, -np.inf).max(axis=1)
        return np.where(real.any(axis=1)[:, None], pooled, 0.0).astype(np.float32)
    counts = np.maximum(real.sum(axis=1), 1)[:, None]
    return (np.einsum("ntd,nt->nd", values, real) / counts).astype(np.float32)
