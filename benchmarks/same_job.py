"""The scikit-learn side of ``test_fit_same_job.py``: probecore's job done with scikit-learn, as a careful user
would run it.

Per layer (``sklearn_path``, run in a joblib/loky worker): ``StandardScaler`` on the train split, then one
``LogisticRegression(solver="lbfgs", warm_start=True)`` refitted along the strengths strongest first
(``C = 1 / (l2 * n_train)``, twice that for two classes), each fit starting from the previous one's
coefficients, the path stopped at the first strength whose validation loss is no better than the best so far,
the strength with the lowest validation loss kept: probecore's rule (``FitOptions``). Everything in the
worker runs under ``threadpoolctl.threadpool_limits(1)`` (scipy's BLAS loaded first, so the cap reaches it).
``sklearn_job`` runs the layers in parallel, one loky worker per core; joblib memory-maps the feature arrays
it passes (above its 1 MB threshold), so workers read them without a pickled copy each.

``sklearn_optimum`` is the calibration's reference: the converged optimum at one strength, in float64, started
from a given point (probecore's probe) and run to ``tol=REFERENCE_TOL``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

REFERENCE_TOL = 1e-10
REFERENCE_MAX_ITER = 20_000
SKLEARN_MAX_ITER = 10_000


def sklearn_c(l2: float, n_train: int, n_classes: int) -> float:
    """scikit-learn's ``C`` for probecore's ``l2`` (mean cross-entropy + l2/2 ||W||^2). With two classes
    scikit-learn fits one vector z = w1 - w0 = 2 w1 at the optimum (where w0 = -w1), and l2/2 (||w0||^2 +
    ||w1||^2) = l2/4 ||z||^2: twice the C."""
    return (2.0 if n_classes == 2 else 1.0) / (l2 * n_train)


def logits(standardized: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """(N, C) float64 logits of a scikit-learn model's coefficients; a binary model's one column becomes two."""
    coef = np.asarray(coef)
    products = (standardized @ coef.T.astype(standardized.dtype)).astype(np.float64) + np.asarray(intercept, np.float64)
    if products.shape[1] == 1:
        products = np.hstack([np.zeros_like(products), products])
    return products


def mean_cross_entropy(standardized: np.ndarray, labels: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> float:
    """Mean cross-entropy (natural log) of a scikit-learn model on standardized features, reduced in float64."""
    z = logits(standardized, coef, intercept)
    largest = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - largest).sum(axis=1)) + largest[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def error(standardized: np.ndarray, labels: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> float:
    return float(np.mean(logits(standardized, coef, intercept).argmax(axis=1) != labels))


def _fit(model, x, y) -> bool:
    """``model.fit``; True when scikit-learn warned that L-BFGS did not converge (max_iter, or a failed line
    search under a tight ``tol``)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return any(issubclass(warning.category, ConvergenceWarning) for warning in caught)


def sklearn_path(
    train: np.ndarray,
    y_train: np.ndarray,
    valid: np.ndarray,
    y_valid: np.ndarray,
    path: Sequence[float],
    tol: float,
    max_iter: int = SKLEARN_MAX_ITER,
) -> dict:
    """One layer's probe, scikit-learn doing probecore's job (module docstring). Features as given: float32 here, which
    scikit-learn 1.9's lbfgs keeps (its loss products run in float32, as probecore's do). Returns the scaler, the kept
    model's coefficients, every strength's validation loss and iterations, the worker's wall time and its
    thread pools as seen inside the limit."""
    import scipy.linalg  # noqa: F401  (loads scipy's own BLAS, so that the limit below caps it too)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=1):
        started = time.perf_counter()
        scaler = StandardScaler()
        x_train = scaler.fit_transform(train)
        x_valid = scaler.transform(valid)
        n_classes = int(max(y_train.max(), y_valid.max())) + 1
        model = LogisticRegression(solver="lbfgs", tol=tol, max_iter=max_iter, warm_start=True)
        points, best = [], None
        for l2 in path:
            model.set_params(C=sklearn_c(l2, len(y_train), n_classes))
            warned = _fit(model, x_train, y_train)
            valid_loss = mean_cross_entropy(x_valid, y_valid, model.coef_, model.intercept_)
            points.append({"l2": l2, "valid_loss": valid_loss, "n_iter": int(model.n_iter_[0]), "warned": warned})
            if best is not None and valid_loss >= best["valid_loss"]:
                break  # probecore's rule: past the bottom of the U
            best = {
                "l2": l2,
                "valid_loss": valid_loss,
                "coef": model.coef_.copy(),
                "intercept": model.intercept_.copy(),
            }
        seconds = time.perf_counter() - started
        pools = sorted({f"{pool['internal_api']}={pool['num_threads']}" for pool in threadpool_info()})
    return {**best, "scaler": scaler, "points": points, "seconds": seconds, "pools": pools}


def sklearn_job(
    layers: Mapping[str, tuple[np.ndarray, np.ndarray]],
    y_train: np.ndarray,
    y_valid: np.ndarray,
    path: Sequence[float],
    tol: float,
    n_jobs: int,
) -> tuple[float, dict[str, dict]]:
    """Every layer's ``sklearn_path`` (layers: name -> (train, valid) features), ``n_jobs`` loky workers at
    once, in the order given: (wall time of the whole ``Parallel`` call, results by layer)."""
    from joblib import Parallel, delayed

    started = time.perf_counter()
    results = Parallel(n_jobs=n_jobs, backend="loky")(
        delayed(sklearn_path)(train, y_train, valid, y_valid, tuple(path), tol) for train, valid in layers.values()
    )
    return time.perf_counter() - started, dict(zip(layers, results))


def warm_workers(n_jobs: int) -> None:
    """Start the loky workers and import scikit-learn in each (untimed, as probecore's numba kernels are
    compiled before its timing starts): joblib reuses these workers in the later ``Parallel`` calls."""
    from joblib import Parallel, delayed

    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    features = rng.standard_normal((60, 4)).astype(np.float32)
    Parallel(n_jobs=n_jobs, backend="loky")(
        delayed(sklearn_path)(features, labels, features, labels, (1e-1, 1e-2), 1e-4) for _ in range(n_jobs)
    )


def sklearn_optimum(
    train: np.ndarray,
    y_train: np.ndarray,
    valid: np.ndarray,
    y_valid: np.ndarray,
    l2: float,
    start: tuple[np.ndarray, np.ndarray] | None = None,
    tol: float = REFERENCE_TOL,
    max_iter: int = REFERENCE_MAX_ITER,
) -> dict:
    """The optimum at ``l2`` to ``tol`` in float64 (features standardized in float64), started from ``start``
    (probecore-shaped ``(weights (d, C), bias (C,))``, or None for zeros): its validation loss, iterations, and
    whether scikit-learn warned (a float64 line search that found no lower loss: at the optimum)."""
    import scipy.linalg  # noqa: F401
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        scaler = StandardScaler()
        x_train = scaler.fit_transform(np.asarray(train, np.float64))
        x_valid = scaler.transform(np.asarray(valid, np.float64))
        n_classes = int(max(y_train.max(), y_valid.max())) + 1
        model = LogisticRegression(
            solver="lbfgs", C=sklearn_c(l2, len(y_train), n_classes), tol=tol, max_iter=max_iter, warm_start=True
        )
        if start is not None:
            weights, bias = (np.asarray(part, np.float64) for part in start)
            if n_classes == 2:  # scikit-learn's one vector: class 1 against class 0
                model.coef_, model.intercept_ = (weights[:, 1] - weights[:, 0])[None, :], bias[1:] - bias[:1]
            else:
                model.coef_, model.intercept_ = weights.T.copy(), bias.copy()
        warned = _fit(model, x_train, y_train)
        return {
            "valid_loss": mean_cross_entropy(x_valid, y_valid, model.coef_, model.intercept_),
            "n_iter": int(model.n_iter_[0]),
            "warned": warned,
        }
