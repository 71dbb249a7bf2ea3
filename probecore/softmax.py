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


@dataclass
class SoftmaxLoss:
    """Mean cross-entropy of ``softmax(X @ W + b)`` plus ``l2 / 2 * ||W||^2`` (the bias is not penalized).

    Parameters travel as one flat float64 vector ``[W.ravel(), b]`` for scipy's optimizers.
    """

    features: np.ndarray  # (N, d) float32
    labels: np.ndarray  # (N,) int64 in [0, n_classes)
    n_classes: int
    l2: float

    def unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_features = self.features.shape[1]
        weights = params[: n_features * self.n_classes].reshape(n_features, self.n_classes)
        return weights.astype(np.float32), params[n_features * self.n_classes :].astype(np.float32)

    def value_and_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = self.unpack(params)
        n_samples = len(self.labels)
        log_probs = log_softmax(self.features @ weights + bias)
        rows = np.arange(n_samples)
        loss = -log_probs[rows, self.labels].sum(dtype=np.float64) / n_samples
        residual = np.exp(log_probs)
        residual[rows, self.labels] -= 1.0
        residual /= n_samples
        grad_weights = (self.features.T @ residual).astype(np.float64) + self.l2 * params[: weights.size].reshape(
            weights.shape
        )
        grad_bias = residual.sum(axis=0, dtype=np.float64)
        penalty = 0.5 * self.l2 * float(np.dot(params[: weights.size], params[: weights.size]))
        return loss + penalty, np.concatenate([grad_weights.ravel(), grad_bias])


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
