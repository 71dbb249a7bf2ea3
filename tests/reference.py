"""Slow, obvious float64 reference implementations the numerical core is tested against.

Plain numpy loops and slices, written from the documented behaviour rather than from the code under test.
"""

from __future__ import annotations

import math

import numpy as np


# --- pooling ---------------------------------------------------------------------------------------------


def pool2d(maps: np.ndarray, window: int, kind: str) -> np.ndarray:
    """Pool (N, C, H, W) maps in non-overlapping window x window tiles, ONNX ``ceil_mode=1`` without padding.

    The output is (N, C, ceil(H / window), ceil(W / window)); an edge tile covers only the cells present, and
    its average is taken over those cells alone.
    """
    maps = np.asarray(maps, dtype=np.float64)
    n_samples, n_channels, height, width = maps.shape
    out_h, out_w = math.ceil(height / window), math.ceil(width / window)
    out = np.empty((n_samples, n_channels, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            tile = maps[:, :, i * window : (i + 1) * window, j * window : (j + 1) * window]
            out[:, :, i, j] = tile.max(axis=(2, 3)) if kind == "max" else tile.mean(axis=(2, 3))
    return out


def pool_sequence(seq: np.ndarray, kind: str) -> np.ndarray:
    """Mean or max of (N, T, D) sequences over T."""
    seq = np.asarray(seq, dtype=np.float64)
    return seq.max(axis=1) if kind == "max" else seq.mean(axis=1)


def smallest_fitting_window(channels: int, height: int, width: int, max_features: int) -> int | None:
    """The smallest square window whose pooled map has at most ``max_features`` values, or None."""
    for window in range(1, max(height, width) + 1):
        if channels * math.ceil(height / window) * math.ceil(width / window) <= max_features:
            return window
    return None


# --- softmax regression ----------------------------------------------------------------------------------


def softmax_objective(features, labels, weights, bias, l2):
    """Mean cross-entropy of softmax(X W + b) plus l2 / 2 * ||W||^2, and its gradient, in float64 loops."""
    features = np.asarray(features, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    n_samples = len(labels)
    loss = 0.0
    grad_weights = np.zeros_like(weights)
    grad_bias = np.zeros_like(bias)
    for x, label in zip(features, labels):
        logits = x @ weights + bias
        top = logits.max()
        log_norm = top + math.log(np.exp(logits - top).sum())
        loss -= logits[label] - log_norm
        probs = np.exp(logits - log_norm)
        probs[label] -= 1.0
        grad_weights += np.outer(x, probs)
        grad_bias += probs
    loss = loss / n_samples + 0.5 * l2 * float((weights**2).sum())
    grad_weights = grad_weights / n_samples + l2 * weights
    return loss, grad_weights, grad_bias / n_samples


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(logits)
    for row, values in enumerate(logits):
        top = values.max()
        out[row] = values - (top + math.log(np.exp(values - top).sum()))
    return out


def split_metrics(log_probs: np.ndarray, labels: np.ndarray) -> tuple[float, float, float | None]:
    """(mean cross-entropy, top-1 error, top-5 error or None when there are 5 classes or fewer).

    Top-1 predicts the first class with the highest score. The label is in the top 5 when fewer than 5
    classes score strictly higher than it (so ties count in its favour).
    """
    n_samples, n_classes = log_probs.shape
    loss, wrong, outside_top5 = 0.0, 0, 0
    for scores, label in zip(log_probs, labels):
        loss -= float(scores[label])
        best = 0
        for c in range(n_classes):
            if scores[c] > scores[best]:
                best = c
        wrong += best != label
        higher = sum(1 for c in range(n_classes) if scores[c] > scores[label])
        outside_top5 += higher >= 5
    return loss / n_samples, wrong / n_samples, (outside_top5 / n_samples if n_classes > 5 else None)
