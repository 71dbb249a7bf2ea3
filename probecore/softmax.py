"""Multinomial softmax regression: the loss object and the metrics every probe is judged by.

The loss owns value and gradient behind one signature (as scikit-learn's ``LinearModelLoss`` does), so the
solver in ``probe.py`` only sees a callable. Compute is float32 (numpy's BLAS), sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """``split_metrics(log_softmax(logits), labels).loss`` without the rest: early stopping's per-iteration
    check, where the loss is all that is needed."""
    largest = logits.max(axis=1)
    log_norm = np.log(np.exp(logits - largest[:, None]).sum(axis=1)) + largest
    return float((log_norm - logits[np.arange(len(labels)), labels]).mean(dtype=np.float64))


KERNELS = ("auto", "fused", "blas")


@dataclass
class SoftmaxLoss:
    """Mean cross-entropy of ``softmax(X @ W + b)`` plus ``l2 / 2 * ||W||^2`` (the bias is not penalized).

    Parameters travel as one flat float64 vector ``[W.ravel(), b]`` for scipy's optimizers. ``kernel``:
    ``"fused"`` (``softmax_kernel``, one pass over the features), ``"blas"`` (two numpy products), or
    ``"auto"``, the one measured faster for this shape (``prefers_fused``).
    """

    features: np.ndarray  # (N, d) float32, C-contiguous
    labels: np.ndarray  # (N,) int64 in [0, n_classes)
    n_classes: int
    l2: float
    kernel: str = "auto"

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel == "auto":
            self.kernel = "fused" if prefers_fused(*self.features.shape, self.n_classes) else "blas"

    def unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_features = self.features.shape[1]
        weights = params[: n_features * self.n_classes].reshape(n_features, self.n_classes)
        return weights.astype(np.float32), params[n_features * self.n_classes :].astype(np.float32)

    def value_and_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = self.unpack(params)
        loss, grad_weights, grad_bias = (self._fused if self.kernel == "fused" else self._two_pass)(weights, bias)
        flat_weights = params[: weights.size]
        grad_weights = grad_weights.ravel() + self.l2 * flat_weights
        penalty = 0.5 * self.l2 * float(np.dot(flat_weights, flat_weights))
        return loss + penalty, np.concatenate([grad_weights, grad_bias])

    def _fused(self, weights, bias):
        from .softmax_kernel import softmax_loss_grad  # numba: imported at the first fused evaluation

        grad_weights = np.empty(weights.shape)
        grad_bias = np.empty(self.n_classes)
        loss = softmax_loss_grad(self.features, self.labels, weights, bias, grad_weights, grad_bias)
        return loss, grad_weights, grad_bias

    def _two_pass(self, weights, bias):
        n_samples = len(self.labels)
        log_probs = log_softmax(self.features @ weights + bias)
        rows = np.arange(n_samples)
        loss = -log_probs[rows, self.labels].sum(dtype=np.float64) / n_samples
        residual = np.exp(log_probs)
        residual[rows, self.labels] -= 1.0
        residual /= n_samples
        return loss, (self.features.T @ residual).astype(np.float64), residual.sum(axis=0, dtype=np.float64)


FUSED_MAX_CLASSES = 32


def prefers_fused(n_samples: int, n_features: int, n_classes: int) -> bool:
    """Whether the fused kernel beats the two-pass one at this shape, single-threaded (benchmarks/README.md):
    up to a few dozen classes it saves a pass over the features; with more, its per-class exp and
    normalisation loops (scalar in numba, vectorized in numpy) cost more than that pass."""
    return n_classes <= FUSED_MAX_CLASSES


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
