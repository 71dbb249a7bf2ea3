"""Fitting one linear softmax probe: L-BFGS on the convex loss, early stopping on the validation split."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from .errors import ProbeError
from .softmax import SoftmaxLoss, SplitMetrics, log_softmax, split_metrics


@dataclass(frozen=True)
class FitOptions:
    """How each probe is fitted.

    ``l2`` multiplies ``||W||^2 / 2`` next to the *mean* cross-entropy, so it does not scale with the number
    of samples (scikit-learn's ``C`` is ``1 / (l2 * n_train)``, or twice that for two classes, where it fits
    one weight vector instead of two). Fitting stops when the validation loss has
    not improved for ``patience`` L-BFGS iterations, keeping the best parameters seen, or when L-BFGS
    converges (``tol``) or reaches ``max_iter``. Features are standardized with the training split's mean
    and spread unless ``standardize`` is False.

    ``blas_threads`` caps BLAS threads while fitting (None leaves them alone): the products here are small,
    and waiting on BLAS thread hand-offs made fits 4 to 9 times slower on 2 cores (benchmarks/README.md).
    """

    l2: float = 3e-3
    max_iter: int = 1000
    patience: int = 50
    tol: float = 1e-7
    standardize: bool = True
    blas_threads: int | None = 1

    def __post_init__(self):
        if not self.l2 >= 0:
            raise ProbeError(f"l2 must be zero or positive, got {self.l2}")
        if self.max_iter < 1 or self.patience < 1:
            raise ProbeError(f"max_iter and patience must be at least 1, got {self.max_iter} and {self.patience}")


@dataclass
class Probe:
    """A fitted probe: ``softmax(((x - mean) / scale) @ weights + bias)`` over ``n_classes`` classes."""

    weights: np.ndarray  # (d, C) float32
    bias: np.ndarray  # (C,) float32
    mean: np.ndarray  # (d,) float32
    scale: np.ndarray  # (d,) float32
    n_iter: int
    stop_reason: str  # "converged", "early_stopping" or "max_iter"
    fit_seconds: float

    def log_proba(self, features: np.ndarray) -> np.ndarray:
        standardized = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        return log_softmax(standardized @ self.weights + self.bias)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class indices (positions in the label encoding), shape (N,)."""
        return self.log_proba(features).argmax(axis=1)

    def evaluate(self, features: np.ndarray, labels: np.ndarray) -> SplitMetrics:
        return split_metrics(self.log_proba(features), labels)


def fit_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    n_classes: int,
    valid_features: np.ndarray | None = None,
    valid_labels: np.ndarray | None = None,
    options: FitOptions = FitOptions(),
) -> Probe:
    """Fit a probe on (N, d) features and integer labels in ``[0, n_classes)``."""
    from scipy.optimize import minimize  # 50 MB of imports, not needed until the first fit

    started = time.perf_counter()
    train_features = np.asarray(train_features, dtype=np.float32)
    if options.standardize:
        mean = train_features.mean(axis=0, dtype=np.float64).astype(np.float32)
        scale = train_features.std(axis=0, dtype=np.float64).astype(np.float32)
        scale[~(scale > 1e-12)] = 1.0  # constant features stay at zero after centering
    else:
        mean = np.zeros(train_features.shape[1], np.float32)
        scale = np.ones(train_features.shape[1], np.float32)
    standardized = np.ascontiguousarray((train_features - mean) / scale)
    loss = SoftmaxLoss(standardized, np.asarray(train_labels, np.int64), n_classes, options.l2)
    params = np.zeros(standardized.shape[1] * n_classes + n_classes)

    stopper = None
    if valid_features is not None and valid_labels is not None:
        valid_standardized = (np.asarray(valid_features, dtype=np.float32) - mean) / scale
        stopper = _EarlyStopping(loss, valid_standardized, np.asarray(valid_labels, np.int64), options.patience)
    with threadpool_limits(limits=options.blas_threads, user_api="blas"):
        result = minimize(
            loss.value_and_grad,
            params,
            jac=True,
            method="L-BFGS-B",
            callback=stopper,
            options={"maxiter": options.max_iter, "ftol": options.tol, "gtol": options.tol, "maxcor": 20},
        )
    best = result.x
    stop_reason = "converged" if result.success else "max_iter"
    if stopper is not None:
        best = stopper.best_params if stopper.best_params is not None else result.x
        if stopper.stopped:
            stop_reason = "early_stopping"
    weights, bias = loss.unpack(best)
    return Probe(weights, bias, mean, scale, int(result.nit), stop_reason, time.perf_counter() - started)


class _EarlyStopping:
    """L-BFGS callback: keeps the parameters with the best validation loss, stops after ``patience`` misses."""

    def __init__(self, loss: SoftmaxLoss, features: np.ndarray, labels: np.ndarray, patience: int):
        self.loss, self.features, self.labels, self.patience = loss, features, labels, patience
        self.best_loss, self.best_params, self.misses, self.stopped = np.inf, None, 0, False

    def __call__(self, intermediate_result):
        weights, bias = self.loss.unpack(intermediate_result.x)
        valid_loss = split_metrics(log_softmax(self.features @ weights + bias), self.labels).loss
        if self.best_params is None or valid_loss < self.best_loss - 1e-6 * abs(self.best_loss):
            self.best_loss, self.best_params, self.misses = valid_loss, intermediate_result.x.copy(), 0
            return
        self.misses += 1
        if self.misses >= self.patience:
            self.stopped = True
            raise StopIteration
