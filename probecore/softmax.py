"""Multinomial softmax regression: the loss object and the metrics every probe is judged by.

The loss owns value and gradient behind one signature (as scikit-learn's ``LinearModelLoss`` does), so the
solver in ``probe.py`` only sees a callable. Compute is float32 (numpy's BLAS), sums are float64.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """``split_metrics(log_softmax(logits), labels).loss`` without the rest."""
    largest = logits.max(axis=1)
    log_norm = np.log(np.exp(logits - largest[:, None]).sum(axis=1)) + largest
    return float((log_norm - logits[np.arange(len(labels)), labels]).mean(dtype=np.float64))


KERNELS = ("auto", "fused", "blas")


def unpack(params: np.ndarray, n_features: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 parameters ``[W.ravel(), b]`` as float32 weights (d, C) and bias (C,)."""
    weights = params[: n_features * n_classes].reshape(n_features, n_classes)
    return weights.astype(np.float32), params[n_features * n_classes :].astype(np.float32)


class LossEvaluator(Protocol):
    """What a probe's fit needs of its loss (``SoftmaxLoss`` here, on the host; a backend may evaluate the same
    objective on a device: ``probecore.backends.onnx_fit``). Parameters are flat float64 ``[W.ravel(), b]``;
    ``l2`` is set between the fits of a path. ``held_out_loss`` is asked for one fit's validation split at
    the iterations its stopping rule looks at (the same arrays each time), without the L2 term."""

    l2: float

    def value_and_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]: ...

    def held_out_loss(self, params: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float: ...


# (standardized (N, d) float32 features, (N,) int64 labels, n_classes, l2) -> the evaluator of one fit
EvaluatorFactory = Callable[[np.ndarray, np.ndarray, int, float], LossEvaluator]


@dataclass
class SoftmaxLoss:
    """Mean cross-entropy of ``softmax(X @ W + b)`` plus ``l2 / 2 * ||W||^2`` (the bias is not penalized).

    Parameters travel as one flat float64 vector ``[W.ravel(), b]`` (W is (d, C), row-major) for scipy's
    optimizers. ``kernel``: ``"fused"`` (``softmax_kernel``, one pass over the features), ``"blas"`` (two
    numpy products), or ``"auto"``, the one measured faster for this shape (``prefers_fused``).
    ``value_and_grad`` reads the parameters where they are (views, no float32 copy) and the fused kernel
    writes the gradient straight into the one array it returns.

    With a ``pool``, an evaluation is cut into row chunks (``row_chunks``: fixed by the shape alone, so the
    result does not depend on how many threads run them) that the pool's threads evaluate at once, and their
    sums are added in order: one fit then uses every core the pool has (``probe.fit_probes`` shares one pool
    among all its layers' fits, so cores left idle by fits that finished go to those still running).
    """

    features: np.ndarray  # (N, d) float32, C-contiguous (converted once here if it is not)
    labels: np.ndarray  # (N,) int64 in [0, n_classes)
    n_classes: int
    l2: float
    kernel: str = "auto"
    pool: Executor | None = field(default=None, repr=False, compare=False)
    # with few features, the fused kernel's copy of them, transposed block by block (``transposed``): made
    # here, so later changes to ``features`` do not reach it
    _transposed_blocks: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _chunks: list[tuple[int, int]] = field(default_factory=list, init=False, repr=False, compare=False)
    # each chunk's sums (``_rows``), one row each, kept: new arrays each time cost page faults
    _parts: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        if self.features.ndim != 2 or self.features.shape[0] == 0 or self.features.shape[1] == 0:
            raise ValueError(f"features must be a non-empty (N, d) array, got shape {self.features.shape}")
        if self.labels.shape != (self.features.shape[0],):
            raise ValueError(f"labels must have shape ({self.features.shape[0]},), got {self.labels.shape}")
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be at least 1, got {self.n_classes}")
        if self.labels.min() < 0 or self.labels.max() >= self.n_classes:  # the kernel indexes with them
            raise ValueError(
                f"labels must lie in [0, {self.n_classes}), got {self.labels.min()} to {self.labels.max()}"
            )
        if self.kernel == "auto":
            self.kernel = "fused" if prefers_fused(*self.features.shape, self.n_classes) else "blas"
        if self.kernel == "fused" and transposed(self.features.shape[1]):
            from .softmax_kernel import transpose_blocks

            self._transposed_blocks = transpose_blocks(self.features, self.n_classes)
        self._chunks = [(0, len(self.labels))]
        if self.pool is not None:
            from .softmax_kernel import transposed_block_rows

            unit = transposed_block_rows(self.n_classes) if self._transposed_blocks is not None else 4
            self._chunks = row_chunks(*self.features.shape, self.n_classes, unit)

    def unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return unpack(params, self.features.shape[1], self.n_classes)

    def value_and_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        """The chunks' sums (``_rows``), added in chunk order, then the mean, its gradient and the L2 term."""
        params = np.ascontiguousarray(params, dtype=np.float64)  # scipy's already is: no copy
        n_samples, n_features = self.features.shape
        n_weights = n_features * self.n_classes
        flat_weights = params[:n_weights]
        weights, bias = flat_weights.reshape(-1, self.n_classes), params[n_weights:]
        if self.kernel == "blas":
            prepared = (weights.astype(np.float32), bias.astype(np.float32))
        else:
            from .softmax_kernel import shifted_weights  # numba: imported at the first fused evaluation

            prepared = shifted_weights(weights, bias, self._width)
        total = self._sum_chunks(prepared)
        sums = self._parts[0] if len(self._parts) == 1 else self._parts.sum(axis=0)  # row by row: a fixed order
        grad = np.empty(len(params))
        grad_weights, grad_bias = grad[:n_weights].reshape(weights.shape), grad[n_weights:]
        if self.kernel == "blas":
            np.divide(sums[:n_weights].reshape(weights.shape), n_samples, out=grad_weights)
            grad_weights += self.l2 * weights
            np.divide(sums[n_weights:], n_samples, out=grad_bias)
            return total / n_samples + 0.5 * self.l2 * float(np.dot(flat_weights, flat_weights)), grad
        from .softmax_kernel import finish

        sums_weights, sums_bias = self._fused_sums(sums)
        return finish(sums_weights, sums_bias, weights, self.l2, n_samples, total, grad_weights, grad_bias), grad

    def _sum_chunks(self, prepared) -> float:
        """Each chunk's sums into its row of ``_parts``; returns the summed cross-entropy. On the pool, up to one
        task per thread, each taking the next chunk until none is left: one hand-off per thread rather than per
        chunk, and a task that starts late (its thread busy with another fit's chunks) finds the work done."""
        if self._parts is None:
            self._parts = np.empty((len(self._chunks), self._part_size()))
        if len(self._chunks) == 1:
            return self._rows(*self._chunks[0], prepared, self._parts[0])
        totals = np.empty(len(self._chunks))
        chunks, lock = iter(range(len(self._chunks))), threading.Lock()

        def work():
            while True:
                with lock:
                    index = next(chunks, None)
                if index is None:
                    return
                totals[index] = self._rows(*self._chunks[index], prepared, self._parts[index])

        # ThreadPoolExecutor tells its size only there; a pool without it gets a task per chunk
        tasks = min(len(self._chunks), getattr(self.pool, "_max_workers", len(self._chunks)))
        for future in [self.pool.submit(work) for _ in range(tasks)]:
            future.result()
        return float(totals.sum())

    @property
    def _width(self) -> int:
        """The length of a features row in the fused kernel's layout (d, or the transposed blocks' padded d)."""
        return self.features.shape[1] if self._transposed_blocks is None else self._transposed_blocks.shape[1]

    def _part_size(self) -> int:
        if self.kernel == "blas":
            return (self.features.shape[1] + 1) * self.n_classes
        return (self.n_classes - 1) * self._width + self.n_classes

    def _fused_sums(self, part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A part's views as the fused kernels' sums: (C - 1, ``_width``) and the bias's (C,)."""
        size = (self.n_classes - 1) * self._width
        return part[:size].reshape(self.n_classes - 1, self._width), part[size:]

    def _rows(self, start: int, stop: int, prepared, part: np.ndarray) -> float:
        """The summed cross-entropy of rows [start, stop), with the sums its gradient needs written into
        ``part``: the fused kernels' (``softmax_kernel.softmax_sums``), or X'R and R's column sums (BLAS)."""
        if self.kernel == "blas":
            n_weights = self.features.shape[1] * self.n_classes
            sums_weights = part[:n_weights].reshape(-1, self.n_classes)
            rows, labels = self.features[start:stop], self.labels[start:stop]
            return self._two_pass(rows, labels, *prepared, sums_weights, part[n_weights:])
        from . import softmax_kernel

        if self._transposed_blocks is None:  # all the rows: the kernel prefetches the next chunk's first ones
            return softmax_kernel.softmax_sums(self.features, self.labels, start, stop, *prepared, *self._fused_sums(part))
        block = self._transposed_blocks.shape[2]
        blocks = self._transposed_blocks[start // block : -(-stop // block)]
        return softmax_kernel.softmax_sums_transposed(blocks, self.labels[start:stop], *prepared, *self._fused_sums(part))

    def held_out_loss(self, params: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
        """Mean cross-entropy (no L2 term) of the probe ``params`` on other (N, d) float32 features: the settled
        test's validation loss. Up to ``VALUE_KERNEL_MAX_CLASSES`` classes by the fused kernel's
        logits pass, which reads the parameters where they are (2 to 3 times faster than numpy's thin
        product there, slower beyond: measured at 2 to 1000 classes)."""
        n_weights = self.features.shape[1] * self.n_classes
        weights, bias = params[:n_weights].reshape(-1, self.n_classes), params[n_weights:]
        if self.n_classes <= VALUE_KERNEL_MAX_CLASSES:
            from .softmax_kernel import softmax_loss

            return softmax_loss(features, labels, weights, bias)
        return mean_cross_entropy(features @ weights.astype(np.float32) + bias.astype(np.float32), labels)

    @staticmethod
    def _two_pass(features, labels, weights, bias, sums_weights, sums_bias) -> float:
        """``_rows`` by two numpy products: the summed cross-entropy, X'R and R's column sums."""
        log_probs = log_softmax(features @ weights + bias)
        rows = np.arange(len(labels))
        total = -log_probs[rows, labels].sum(dtype=np.float64)
        residual = np.exp(log_probs)
        residual[rows, labels] -= 1.0
        sums_weights[...] = features.T @ residual
        residual.sum(axis=0, dtype=np.float64, out=sums_bias)
        return float(total)


VALUE_KERNEL_MAX_CLASSES = 64
# Work per row chunk (4 N d C flops): about 1 to 2 ms on one core, so that a chunk's fixed costs (its
# own gradient sums, the hand-off to a thread: 20 to 50 us) stay within a few per cent.
CHUNK_FLOPS = 1e8
# Each chunk writes a (d, C) gradient of its own, which the evaluation then scales and adds: with many classes,
# chunks of few rows cost more in those than in their products (5000 x 512, C = 1000: 105 chunks of 48 rows
# took 1.7 times as long as 4 of 1252; 20 000 x 2048, C = 100: 162 chunks 1.2 times as long as 25). So a chunk
# has at least this many rows per class, unless that would leave fewer than MIN_CHUNKS for one fit's threads.
MIN_ROWS_PER_CLASS = 8
MIN_CHUNKS = 4


def row_chunks(n_samples: int, n_features: int, n_classes: int, unit: int = 4) -> list[tuple[int, int]]:
    """Row ranges of about ``CHUNK_FLOPS`` each (at least ``MIN_ROWS_PER_CLASS`` rows per class), whole
    multiples of ``unit`` rows (the transposed layout's blocks) but the last: fixed by the shape, so a chunked
    evaluation gives the same sums on any pool."""
    rows = int(CHUNK_FLOPS // (4 * n_features * n_classes))
    rows = max(rows, min(MIN_ROWS_PER_CLASS * n_classes, -(-n_samples // MIN_CHUNKS)))
    rows = max(unit, -(-rows // unit) * unit)
    return [(start, min(start + rows, n_samples)) for start in range(0, n_samples, rows)]


TRANSPOSED_MAX_FEATURES = 128
# The fused kernel keeps its weights and gradient sums, (C - 1) x d float32 each, in cache with a block of
# rows (of logits, in the transposed layout); past these sizes the two-pass BLAS version, whose products
# are then wide enough for BLAS, is faster (benchmarks/README.md, where L2 is 1 MiB a core).
FUSED_MAX_WEIGHTS = 192 * 1024
FUSED_MAX_WEIGHTS_TRANSPOSED = 96 * 1024


def transposed(n_features: int) -> bool:
    """Whether the fused kernel runs on a transposed copy of the features (``softmax_kernel``,
    ``softmax_loss_grad_transposed``): with few features a row's dot products are too short to run at speed.
    Measured 2 to 3 times faster at 32 to 64 features, 1.1 to 1.6 times at 128 (even with 2 classes), about
    even from 192 to 384 (slower with 2 classes), slower beyond."""
    return n_features <= TRANSPOSED_MAX_FEATURES


def prefers_fused(n_samples: int, n_features: int, n_classes: int) -> bool:
    """Whether the fused kernel beats the two-pass one at this shape, single-threaded (benchmarks/README.md,
    "Softmax kernel against the machine's limits"): from 2 classes to a few hundred, to 1000 with 64
    features; the two-pass one from about 100 classes at 2048 features."""
    limit = FUSED_MAX_WEIGHTS_TRANSPOSED if transposed(n_features) else FUSED_MAX_WEIGHTS
    return (n_classes - 1) * n_features <= limit


@dataclass(frozen=True)
class SplitMetrics:
    """How well a probe (or the model itself) predicts one split."""

    n_samples: int
    loss: float | None  # mean cross-entropy; None where only predictions are known
    error: float  # top-1 error
    top5_error: float | None  # only with more than 5 classes

    @property
    def error_interval(self) -> tuple[float, float]:
        """Exact (Clopper-Pearson) 95% interval for the top-1 error, from ``n_samples`` independent trials."""
        return binomial_interval(round(self.error * self.n_samples), self.n_samples)

    def to_dict(self) -> dict:
        return {
            "n": self.n_samples,
            "loss": self.loss,
            "error": self.error,
            "error_ci95": list(self.error_interval),
            "top5_error": self.top5_error,
        }


def binomial_interval(errors: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval for a proportion: conservative, exact at the extremes (0 or all errors)."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if errors == 0 else float(beta.ppf(tail, errors, trials - errors + 1))
    high = 1.0 if errors == trials else float(beta.ppf(1 - tail, errors + 1, trials - errors))
    return low, high


def split_metrics(log_probs: np.ndarray, labels: np.ndarray) -> SplitMetrics:
    """Cross-entropy, top-1 and top-5 error of (N, C) log-probabilities against integer labels."""
    n_samples, n_classes = log_probs.shape
    rows = np.arange(n_samples)
    loss = float(-log_probs[rows, labels].mean(dtype=np.float64))
    error = float(np.mean(log_probs.argmax(axis=1) != labels))
    top5 = None
    if n_classes > 5:
        label_scores = log_probs[rows, labels][:, None]
        # The label is in the top 5 when fewer than 5 classes score strictly higher than it.
        top5 = float(np.mean((log_probs > label_scores).sum(axis=1) >= 5))
    return SplitMetrics(n_samples, loss, error, top5)
