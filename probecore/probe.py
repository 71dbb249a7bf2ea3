"""Fitting linear softmax probes: L-BFGS on the convex loss along a path of L2 strengths, each fit run until
the probe has settled on the validation split, and several layers' probes at once."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np

from .errors import ProbeError
from .precondition import SpectralPreconditioner
from .softmax import KERNELS, EvaluatorFactory, LossEvaluator, SoftmaxLoss, SplitMetrics, log_softmax, split_metrics, unpack

DEFAULT_L2 = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


@dataclass(frozen=True)
class FitOptions:
    """How each probe is fitted.

    ``l2`` multiplies ``||W||^2 / 2`` next to the *mean* cross-entropy, so it does not scale with the number
    of samples (scikit-learn's ``C`` is ``1 / (l2 * n_train)``, or twice that for two classes, where it fits
    one weight vector instead of two). One value fixes the strength; several (the default, log-spaced) are a
    path: tried strongest first, each fit starting from the previous one's weights, and the strength with
    the lowest validation loss is kept. The path stops at the first strength that does no better on
    validation than the best so far (validation loss is U-shaped in the strength).

    Each strength first gets a *look*: L-BFGS until its validation loss and objective have stopped moving
    at a coarse precision (within 5 % of the optimum's validation loss, measured: benchmarks/README.md). A
    strength that does clearly worse than the best by that margin ends the path there, one clearly better
    becomes the best; where two strengths are closer than that, both are *settled* before one is chosen,
    and the chosen one always is: L-BFGS until over the last ``patience`` iterations its validation loss
    moved by at most 0.1 % and its training objective fell by at most 1e-5 of itself, so the probe no
    longer changes at the precision reported (its validation loss within 0.5 % and its test error within
    0.3 points of the fully converged optimum at that strength: tested on fresh random problems). A fit
    cut short can look worse than it ends up, so no strength is judged on a fit that has not stopped by
    one of these rules. Without a validation split a fit runs until L-BFGS (``lbfgs.minimize``) converges
    (``tol``) or reaches ``max_iter``. A fit that no step can improve by more than the float32 loss resolves
    ends there, as settled (with a validation split) or converged (without). Each ``PathPoint.stop_reason``
    says how a fit ended: ``looked``, ``settled``, ``converged``, ``max_iter``, or ``line_search_failed`` when
    no step lowered the loss. With ``precondition`` L-BFGS starts from
    ``precondition.SpectralPreconditioner`` as its guess of the inverse Hessian: the same objective and
    optimum, reached in fewer iterations. Features are standardized with the training split's mean and
    spread unless ``standardize`` is False.

    Threads: ``fit_probes`` fits up to ``threads`` layers at once (None: one per available core), and their
    loss evaluations share one pool of ``threads`` threads in row chunks, so one layer alone (``fit_probe``,
    or the last of ``fit_probes``) spreads over every core while many layers take one core each. BLAS
    products run on ``blas_threads`` threads (None leaves the libraries' pools alone): waiting on BLAS
    thread hand-offs made small fits 4 to 9 times slower on 2 cores (benchmarks/README.md).
    ``kernel`` picks the loss evaluation (``softmax.SoftmaxLoss``): ``auto`` takes the faster one per shape.
    """

    l2: float | Sequence[float] = DEFAULT_L2
    max_iter: int = 1000
    patience: int = 10
    tol: float = 1e-7
    standardize: bool = True
    threads: int | None = None
    blas_threads: int | None = 1
    kernel: str = "auto"
    precondition: bool = True

    def __post_init__(self):
        strengths = (self.l2,) if np.isscalar(self.l2) else tuple(self.l2)
        if not strengths or not all(float(value) >= 0 for value in strengths):
            raise ProbeError(f"l2 must be one or more strengths, zero or positive, got {self.l2}")
        object.__setattr__(self, "l2", strengths[0] if len(strengths) == 1 else tuple(map(float, strengths)))
        if self.max_iter < 1 or self.patience < 1:
            raise ProbeError(f"max_iter and patience must be at least 1, got {self.max_iter} and {self.patience}")
        if self.threads is not None and self.threads < 1:
            raise ProbeError(f"threads must be at least 1, got {self.threads}")
        if self.kernel not in KERNELS:
            raise ProbeError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")

    @property
    def l2_path(self) -> tuple[float, ...]:
        """The strengths to try, strongest first."""
        return tuple(sorted((float(value) for value in np.atleast_1d(self.l2)), reverse=True))


@dataclass(frozen=True)
class PathPoint:
    """One strength of the regularization path: the validation loss of its best parameters, and its cost."""

    l2: float
    valid_loss: float | None
    n_iter: int
    # "looked" (a first look only: a clear loser), "settled", "converged", "max_iter", "line_search_failed" or
    # "abnormal: <why>" (``lbfgs.Result``)
    stop_reason: str

    def to_dict(self) -> dict:
        return {"l2": self.l2, "valid_loss": self.valid_loss, "iterations": self.n_iter, "stop_reason": self.stop_reason}


@dataclass
class Probe:
    """A fitted probe: ``softmax(((x - mean) / scale) @ weights + bias)`` over ``n_classes`` classes."""

    weights: np.ndarray  # (d, C) float32
    bias: np.ndarray  # (C,) float32
    mean: np.ndarray  # (d,) float32
    scale: np.ndarray  # (d,) float32
    l2: float  # the strength chosen (the only one, or the path's best on validation)
    n_iter: int  # L-BFGS iterations, the whole path
    stop_reason: str  # of the chosen strength's fit
    fit_seconds: float
    path: list[PathPoint] = field(default_factory=list)

    def log_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, C) log-probabilities; the features standardized a block of rows at a time (no copy of them all)."""
        logits = np.empty((len(features), len(self.bias)), np.float32)
        for start in range(0, len(features), STANDARDIZE_ROWS):
            block = _standardized(features[start : start + STANDARDIZE_ROWS], self.mean, self.scale)
            np.matmul(block, self.weights, out=logits[start : start + STANDARDIZE_ROWS])
        return log_softmax(logits + self.bias)

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
    evaluator: EvaluatorFactory | None = None,
) -> Probe:
    """Fit a probe on (N, d) features and integer labels in ``[0, n_classes)``, its loss evaluations spread
    over ``options.threads`` threads (row chunks, ``softmax.SoftmaxLoss``), or made by ``evaluator`` (the same
    objective elsewhere, e.g. on a GPU: ``probecore.backends.onnx_fit.DeviceFitter``)."""
    with blas_limits(options.blas_threads), ThreadPoolExecutor(options.threads or available_cores()) as pool:
        return _fit(train_features, train_labels, n_classes, valid_features, valid_labels, options, pool, evaluator)


def fit_probes(
    train: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    n_classes: int,
    valid: Mapping[str, np.ndarray] | None = None,
    valid_labels: np.ndarray | None = None,
    options: FitOptions = FitOptions(),
    done: Callable[[str, Probe], None] | None = None,
    evaluator: EvaluatorFactory | None = None,
) -> dict[str, Probe]:
    """One probe per entry of ``train`` (layer name -> features), up to ``options.threads`` fitted at once,
    the largest first.

    The fits share one pool of ``options.threads`` threads for their loss evaluations (row chunks, which
    release the GIL and read the features without copies), so when fewer layers than threads are left, each
    remaining fit spreads over the idle ones, and no more than that many threads ever compute. Each probe is
    the same as ``fit_probe`` would give alone. ``done(name, probe)`` is called as each one finishes.
    ``evaluator``: as in ``fit_probe``; the fits then run their L-BFGS on these threads and their evaluations
    wherever the evaluator does."""
    threads = options.threads or available_cores()
    with (
        blas_limits(options.blas_threads),
        ThreadPoolExecutor(threads) as pool,
        ThreadPoolExecutor(max_workers=min(threads, max(len(train), 1))) as fits,
    ):
        futures = {
            fits.submit(
                _fit, train[name], train_labels, n_classes, None if valid is None else valid[name], valid_labels,
                options, pool, evaluator,
            ): name
            for name in largest_first(train)
        }  # fmt: skip
        probes = {}
        for future in as_completed(futures):
            name = futures[future]
            probes[name] = future.result()
            if done is not None:
                done(name, probes[name])
    return {name: probes[name] for name in train}


def largest_first(train: Mapping[str, np.ndarray]) -> list[str]:
    """The layers widest first (they share N and C), so the longest fits start first and the short ones fill in
    at the end."""
    return sorted(train, key=lambda name: -np.shape(train[name])[1])


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def blas_limits(threads: int | None):
    """Cap BLAS thread pools, scipy's included: it brings its own BLAS (used by the fused kernel's products),
    which must be loaded before the cap is set or it escapes it."""
    import scipy.linalg  # noqa: F401  (loads scipy's BLAS)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def _fit(
    train_features, train_labels, n_classes, valid_features, valid_labels, options: FitOptions, pool, evaluator=None
) -> Probe:
    started = time.perf_counter()
    path = options.l2_path
    has_valid = valid_features is not None and valid_labels is not None
    if len(path) > 1 and not has_valid:
        raise ProbeError(
            f"choosing among {len(path)} L2 strengths needs a validation split; pass one, or a single strength"
        )
    mean, scale = _moments(train_features) if options.standardize else _identity(np.shape(train_features)[1])
    standardized = _standardized(train_features, mean, scale)
    labels = np.asarray(train_labels, np.int64)
    if evaluator is None:
        loss = SoftmaxLoss(standardized, labels, n_classes, path[0], options.kernel, pool)
    else:
        loss = evaluator(standardized, labels, n_classes, path[0])
    valid = None
    if has_valid:
        valid = (_standardized(valid_features, mean, scale), np.ascontiguousarray(valid_labels, np.int64))

    preconditioner = None
    if options.precondition:  # its products where the evaluator has the features, if it offers them
        preconditioner = SpectralPreconditioner.of(standardized, products=getattr(loss, "gram_product", None))
    fits = _Path(loss, preconditioner, valid, n_classes, options)
    n_features = standardized.shape[1]
    start = np.zeros(n_features * n_classes + n_classes)
    best = fits.first(path[0], start) if len(path) == 1 else fits.search(path, start)
    weights, bias = unpack(best.params, n_features, n_classes)
    points = [fit.point for fit in fits.tried]
    n_iter = sum(point.n_iter for point in points)
    chosen, seconds = best.point, time.perf_counter() - started
    return Probe(weights, bias, mean, scale, chosen.l2, n_iter, chosen.stop_reason, seconds, points)


STANDARDIZE_ROWS = 1024  # rows standardized at a time: temporaries of this size, never of the whole split


def _moments(features) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (float64 sums, float32 results) in one pass, a block of rows at a
    time: the features (float32, float16, a memory map) are never copied whole. The sums are of the features
    less the first block's mean, so the variance does not cancel when the mean is large against the spread. A
    constant feature gets scale 1, so it stays at zero after centering."""
    from .kernels import add_moments  # numba: loaded at the first fit

    n_samples = len(features)
    shift = np.mean(_block(features, 0), axis=0, dtype=np.float64)
    sums, squares = np.zeros_like(shift), np.zeros_like(shift)
    for start in range(0, n_samples, STANDARDIZE_ROWS):
        add_moments(_block(features, start), shift, sums, squares)
    offset = sums / n_samples
    scale = np.sqrt(np.maximum(squares / n_samples - offset * offset, 0.0)).astype(np.float32)
    scale[~(scale > 1e-12)] = 1.0
    return (shift + offset).astype(np.float32), scale


def _block(features, start: int) -> np.ndarray:
    """Rows [start, start + STANDARDIZE_ROWS) as the kernels read them: float32 or float64 as they are, and
    read-only, so that features in memory and in the cache's read-only memory map share one compiled kernel (a
    run that needed another would compile it then, under whatever memory it has left)."""
    rows = np.asarray(features[start : start + STANDARDIZE_ROWS])
    rows = rows.view() if rows.dtype in (np.float32, np.float64) else rows.astype(np.float32)
    rows.flags.writeable = False
    return rows


def _identity(n_features: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n_features, np.float32), np.ones(n_features, np.float32)


def _standardized(features, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(features - mean) / scale`` as a new C-contiguous float32 array, written a block of rows at a time: the
    one copy each fit keeps (the kernels read it many times), and no temporary of the whole split."""
    from .kernels import standardize

    out = np.empty(np.shape(features), np.float32)
    for start in range(0, len(out), STANDARDIZE_ROWS):
        standardize(_block(features, start), mean, scale, out[start : start + STANDARDIZE_ROWS])
    return out


@dataclass(frozen=True)
class _Rule:
    """When a fit stops: over the last ``window`` iterations its validation loss moved by at most ``valid`` of
    itself and its training objective fell by at most ``objective`` of itself."""

    window: int
    valid: float
    objective: float


# A first look at a strength, enough to see a clear loser: measured on 35 paths (the demo's layers, four
# ResNet-shaped layers, 24 random problems: benchmarks/README.md), a fit stopped by this rule was within
# 2.9 % of its optimum's validation loss; LOOK_UNCERTAINTY leaves room above that.
LOOK = _Rule(window=3, valid=5e-3, objective=3e-4)
LOOK_UNCERTAINTY = 0.05
SETTLED_VALID = 1e-3  # the settled rule's window is ``FitOptions.patience``
SETTLED_OBJECTIVE = 1e-5
LOSS_RESOLUTION = 1e-7  # relative: every evaluator computes the loss in float32 (its sums in float64)


@dataclass
class _Fit:
    """One strength's fit so far: its parameters, its record of iterations (``_Watch``) and its PathPoint."""

    params: np.ndarray
    watch: _Watch | None
    point: PathPoint

    @property
    def settled(self) -> bool:
        return self.point.stop_reason != "looked"

    @property
    def uncertainty(self) -> float:
        return 0.0 if self.settled else LOOK_UNCERTAINTY


class _Path:
    """The strengths of one probe's path, fitted as the search asks: a first look (``LOOK``) at each, and the
    settled fit (``FitOptions``) only where a choice depends on it."""

    def __init__(self, loss: LossEvaluator, preconditioner, valid, n_classes: int, options: FitOptions):
        self.loss, self.preconditioner, self.valid, self.options = loss, preconditioner, valid, options
        self.n_classes = n_classes
        self.tried: list[_Fit] = []

    def search(self, path: Sequence[float], start: np.ndarray) -> _Fit:
        """The strongest first, each started from the previous one's parameters, until one does worse on
        validation than the best so far (validation loss is U-shaped in the strength). Two strengths whose
        looks are within their uncertainty of each other are both settled before one is chosen; the chosen
        one is always settled."""
        best, params = None, start
        for l2 in path:
            fit = self.first(l2, params, LOOK)
            params = fit.params
            if best is None:
                best = fit
                continue
            worse = fit.point.valid_loss * (1 - fit.uncertainty) > best.point.valid_loss * (1 + best.uncertainty)
            better = fit.point.valid_loss * (1 + fit.uncertainty) < best.point.valid_loss * (1 - best.uncertainty)
            if not (worse or better):
                best, fit = self.settled(best), self.settled(fit)
                better = fit.point.valid_loss < best.point.valid_loss
            if not better:
                break
            best = fit
        return self.settled(best)

    def first(self, l2: float, start: np.ndarray, rule: _Rule | None = None) -> _Fit:
        """A new fit at ``l2`` from ``start``, stopped by ``rule`` (None: the settled rule)."""
        window = max(LOOK.window, self.options.patience)
        watch = None if self.valid is None else _Watch(self.loss, *self.valid, window)
        fit = _Fit(start, watch, PathPoint(l2, None, 0, "looked"))
        self.tried.append(fit)
        return self._run(fit, rule)

    def settled(self, fit: _Fit) -> _Fit:
        return fit if fit.settled else self._run(fit, None)

    def _run(self, fit: _Fit, rule: _Rule | None) -> _Fit:
        """Continue ``fit`` until ``rule`` (or the settled rule, or L-BFGS's own tests) stops it."""
        from .lbfgs import minimize  # numba: compiled code, loaded at the first fit, not by ``import probecore``

        options, loss = self.options, self.loss
        loss.l2 = fit.point.l2
        if fit.watch is not None:
            fit.watch.rule = rule or _Rule(options.patience, SETTLED_VALID, SETTLED_OBJECTIVE)
        precondition = None
        if self.preconditioner is not None:
            precondition = _InitialInverseHessian(loss.l2, self.n_classes, self.preconditioner)
        result = minimize(
            loss.value_and_grad,
            fit.params,
            precondition=precondition,
            max_iter=options.max_iter,
            gtol=options.tol,
            # With a validation split the fit stops when it has settled: the test on the objective's relative fall
            # in one iteration also fires on a slow stretch far from the optimum (1.2 % off in validation loss)
            ftol=options.tol if fit.watch is None else 0.0,
            callback=fit.watch,
            resolution=LOSS_RESOLUTION,
        )
        reason = result.stop_reason
        if reason == "stopped":
            reason = "looked" if rule is not None else "settled"
        elif reason == "at_resolution":  # the probe cannot change any more at the loss's precision
            reason = "converged" if fit.watch is None else "settled"
        valid_loss = None if self.valid is None else loss.held_out_loss(result.x, *self.valid)
        fit.params = result.x
        fit.point = PathPoint(fit.point.l2, valid_loss, fit.point.n_iter + result.n_iter, reason)
        return fit


class _InitialInverseHessian:
    """``lbfgs.Preconditioner``: ``M`` the spectral preconditioner at ``l2`` on the weights, the identity on the
    bias."""

    def __init__(self, l2: float, n_classes: int, preconditioner: SpectralPreconditioner):
        self.preconditioner, self.scales = preconditioner, preconditioner.scales(l2)
        self.n_weights, self.n_classes = len(preconditioner.vectors) * n_classes, n_classes

    def project(self, vector: np.ndarray) -> np.ndarray:
        return self.preconditioner.project(self._weights(vector))

    def apply(self, vector: np.ndarray, projected: np.ndarray) -> np.ndarray:
        out = vector.copy()
        out[: self.n_weights] = self.preconditioner.apply(self._weights(vector), self.scales, projected).ravel()
        return out

    def excess(self, projected: np.ndarray) -> float:
        return self.preconditioner.excess(projected, self.scales)

    def _weights(self, vector: np.ndarray) -> np.ndarray:
        return vector[: self.n_weights].reshape(-1, self.n_classes)


class _Watch:
    """L-BFGS callback: records the training objective after every iteration (across the calls that continue one
    fit) and stops the fit when its ``rule`` holds: the probe no longer changes at the precision asked.

    The validation loss is computed only where the rule needs it: once the objective has stopped falling over
    the window, for each iteration of that window, from the parameters kept for the purpose (the last
    ``window + 1``, in float32 as the loss reads them: about half of what L-BFGS's own history holds). The
    objective's test holds on a few iterations of each fit (4 to 9 of 126 to 249 on the demo's large layers),
    so most validation losses are never computed, and the fit stops where it would if all were."""

    def __init__(self, loss: LossEvaluator, features: np.ndarray, labels: np.ndarray, window: int):
        self.loss, self.features, self.labels = loss, features, labels
        self.rule: _Rule | None = None
        self.objectives: list[float] = []
        self.valid_losses: dict[int, float] = {}  # by iteration, where computed
        self.recent: deque[np.ndarray] = deque(maxlen=window + 1)  # the parameters of the last iterations

    def __call__(self, params: np.ndarray, objective: float) -> bool:
        self.objectives.append(objective)
        self.recent.append(params.astype(np.float32))
        window = self.rule.window
        objectives = self.objectives[-window - 1 :]
        if len(objectives) <= window or objectives[0] - objectives[-1] > self.rule.objective * abs(objectives[-1]):
            return False
        valid = [self._valid_loss(len(self.objectives) - 1 - back) for back in range(window + 1)]
        return max(valid) - min(valid) <= self.rule.valid * valid[0]

    def _valid_loss(self, iteration: int) -> float:
        if iteration not in self.valid_losses:
            params = self.recent[iteration - len(self.objectives)].astype(np.float64)
            self.valid_losses[iteration] = self.loss.held_out_loss(params, self.features, self.labels)
        return self.valid_losses[iteration]
