"""Multinomial softmax regression: the loss object and the metrics every probe is judged by.

The loss owns value and gradient behind one signature (as scikit-learn's ``LinearModelLoss`` does), so the
solver in ``probe.py`` only sees a callable. Compute is float32 (numpy's BLAS), sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """``split_metrics(log_softmax(logits), labels).loss`` without the rest: the settled test's per-iteration
    check, where the loss is all that is needed."""
    largest = logits.max(axis=1)
    log_norm = np.log(np.exp(logits - largest[:, None]).sum(axis=1)) + largest
    return float((log_norm - logits[np.arange(len(labels)), labels]).mean(dtype=np.float64))


KERNELS = ("auto", "fused", "blas")


@dataclass
class SoftmaxLoss:
    """Mean cross-entropy of ``softmax(X @ W + b)`` plus ``l2 / 2 * ||W||^2`` (the bias is not penalized).

    Parameters travel as one flat float64 vector ``[W.ravel(), b]`` (W is (d, C), row-major) for scipy's
    optimizers. ``kernel``: ``"fused"`` (``softmax_kernel``, one pass over the features), ``"blas"`` (two
    numpy products), or ``"auto"``, the one measured faster for this shape (``prefers_fused``).
    ``value_and_grad`` reads the parameters where they are (views, no float32 copy) and the fused kernel
    writes the gradient, L2 term included, straight into the one array it returns.
    """

    features: np.ndarray  # (N, d) float32, C-contiguous (converted once here if it is not)
    labels: np.ndarray  # (N,) int64 in [0, n_classes)
    n_classes: int
    l2: float
    kernel: str = "auto"
    # with few features, the fused kernel's copy of them, transposed block by block (``transposed``): made
    # here, so later changes to ``features`` do not reach it
    _transposed_blocks: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

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

    def unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_features = self.features.shape[1]
        weights = params[: n_features * self.n_classes].reshape(n_features, self.n_classes)
        return weights.astype(np.float32), params[n_features * self.n_classes :].astype(np.float32)

    def value_and_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        params = np.ascontiguousarray(params, dtype=np.float64)  # scipy's already is: no copy
        n_weights = self.features.shape[1] * self.n_classes
        flat_weights = params[:n_weights]
        weights, bias = flat_weights.reshape(-1, self.n_classes), params[n_weights:]
        grad = np.empty(len(params))
        grad_weights, grad_bias = grad[:n_weights].reshape(-1, self.n_classes), grad[n_weights:]
        if self.kernel == "fused":
            kernel, features = self._fused_kernel()
            return kernel(features, self.labels, weights, bias, self.l2, grad_weights, grad_bias), grad
        loss = self._two_pass(weights, bias, grad_weights, grad_bias)
        if self.l2:
            grad_weights += self.l2 * weights
            loss += 0.5 * self.l2 * float(np.dot(flat_weights, flat_weights))
        return loss, grad

    def _fused_kernel(self):
        """The numba kernel for this shape, and the features in the layout it reads."""
        from . import softmax_kernel  # numba: imported at the first fused evaluation

        if self._transposed_blocks is None:
            return softmax_kernel.softmax_loss_grad, self.features
        return softmax_kernel.softmax_loss_grad_transposed, self._transposed_blocks

    def _two_pass(self, weights, bias, grad_weights, grad_bias) -> float:
        n_samples = len(self.labels)
        log_probs = log_softmax(self.features @ weights.astype(np.float32) + bias.astype(np.float32))
        rows = np.arange(n_samples)
        loss = -log_probs[rows, self.labels].sum(dtype=np.float64) / n_samples
        residual = np.exp(log_probs)
        residual[rows, self.labels] -= 1.0
        residual /= n_samples
        grad_weights[...] = self.features.T @ residual
        residual.sum(axis=0, dtype=np.float64, out=grad_bias)
        return float(loss)


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
