"""The probe fitter against scikit-learn's lbfgs logistic regression on the same features, in the same run.

Both minimise the same objective. probecore standardizes with the training mean and spread and minimises
``mean cross-entropy + l2 / 2 * ||W||^2`` (bias unpenalized); scikit-learn's ``LogisticRegression`` on
``StandardScaler``-ed features with ``C = 1 / (l2 * n_train)`` minimises exactly that too (it divides its
summed loss by ``C * n_train``) for three or more classes, the only ones here; with two classes scikit-learn
fits one weight vector, and ``C = 2 / (l2 * n_train)`` matches. Both sides are timed from raw features to a fitted model, standardization
included (probecore does it inside ``fit_probe``; the baseline is a ``StandardScaler`` +
``LogisticRegression`` pipeline).

probecore fits one strength, ``L2`` (no path: ``test_fit_path_vs_sklearn.py`` times the path), to
convergence as scikit-learn does, so the two minimise the same objective to their own tolerances: the
like-for-like comparison of the two solvers, one thread each.

Figures per case (``extra_info`` and the end-of-run summary): both wall times, the time ratio
probecore / scikit-learn (below 1: probecore is faster), both test errors, iterations, objectives.
The only assertions are correctness guards: the two test errors within 1 percentage point, and
probecore's objective no worse than scikit-learn's. No speed target is asserted here.

Threads: probecore caps BLAS at ``FitOptions().blas_threads`` threads while fitting (1 by default); the
scikit-learn baseline runs under the same cap (``threadpoolctl``, its BLAS and OpenMP pools), so the ratio
compares the algorithms rather than thread scheduling. ``test_fit_blas_threads`` times probecore's fit with
that cap against ``blas_threads=None`` (library default pools), to show what the cap is worth.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import probecore
from probecore import bundled
from probecore.backends.onnx_source import OnnxSource
from probe_workload import objective

N_CLASSES = 10
CONVNET_LAYERS = ("pool1", "relu3")  # 32x14x14 maps avg-pooled 2x2 to 1568 features; 128 dense units
L2 = 3e-3  # one strength for both sides (probecore's former default)
SKLEARN_MAX_ITER = 10_000
ERROR_TOLERANCE = 0.01  # test errors may differ by at most 1 percentage point
OBJECTIVE_SLACK = 1e-3  # relative; probecore stops on ftol=1e-7, scikit-learn on gtol=1e-4 (its default)

# (workload, rounds): a round fits both sides once, so keep the slow ones to few rounds.
CASES = [("convnet-relu3", 7), ("convnet-pool1", 3), ("synthetic-relu", 3)]


@pytest.fixture(scope="session")
def convnet_features(mnist) -> dict[str, dict[str, np.ndarray]]:
    """Reduced activations of ``CONVNET_LAYERS`` of the bundled convnet, per split, extracted once."""
    source = OnnxSource(bundled.DEMO_MODEL, device="cpu")
    shapes = {layer.name: layer.shape for layer in source.layers()}
    policy = probecore.ReductionPolicy()
    reductions = {name: probecore.plan_reduction(name, shapes[name], policy) for name in CONVNET_LAYERS}
    features = {name: {} for name in CONVNET_LAYERS}
    for split_name, split in mnist.splits().items():
        parts = {name: [] for name in CONVNET_LAYERS}
        for batch in source.activations(source.check_inputs(split.x), CONVNET_LAYERS, 256):
            for name in CONVNET_LAYERS:
                parts[name].append(reductions[name].apply(batch[name]))
        for name in CONVNET_LAYERS:
            features[name][split_name] = np.concatenate(parts[name])
    return features


def synthetic_relu_features(
    n_samples=10_000, n_inputs=32, width=768, clusters_per_class=3, spread=1.25, seed=0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters (several per class) pushed through a random two-layer ReLU network.

    The classes are not linearly separable in the inputs (each is a union of clusters) and only partly so in
    the ReLU features: a linear probe on these 768 features lands around 10 % test error (train error ~0).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((N_CLASSES * clusters_per_class, n_inputs))
    component = rng.integers(0, len(centers), n_samples)
    labels = component % N_CLASSES
    inputs = centers[component] + spread * rng.standard_normal((n_samples, n_inputs))
    hidden = np.maximum(inputs @ (rng.standard_normal((n_inputs, width)) / np.sqrt(n_inputs)), 0.0)
    features = np.maximum(hidden @ (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)), 0.0)
    return features.astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="session")
def synthetic_split():
    features, labels = synthetic_relu_features()
    bounds = {"train": slice(0, 8000), "valid": slice(8000, 9000), "test": slice(9000, 10_000)}
    return {name: (features[rows], labels[rows]) for name, rows in bounds.items()}


def _workload(name, mnist, convnet_features, synthetic_split):
    if name == "synthetic-relu":
        return synthetic_split
    layer = name.removeprefix("convnet-")
    splits = mnist.splits()
    return {split: (convnet_features[layer][split], splits[split].y) for split in ("train", "valid", "test")}


@pytest.mark.benchmark(group="fit")
@pytest.mark.parametrize(("workload", "rounds"), CASES, ids=[workload for workload, _ in CASES])
def test_fit_vs_sklearn(workload, rounds, mnist, convnet_features, synthetic_split, paired, record):
    data = _workload(workload, mnist, convnet_features, synthetic_split)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    options = probecore.FitOptions(l2=L2)

    def fit_probecore():
        return probecore.fit_probe(x_train, y_train, N_CLASSES, options=options)

    def fit_sklearn():
        model = make_pipeline(
            StandardScaler(),
            LogisticRegression(solver="lbfgs", C=1.0 / (options.l2 * len(y_train)), max_iter=SKLEARN_MAX_ITER),
        )
        with warnings.catch_warnings(), threadpool_limits(limits=getattr(options, "blas_threads", None)):
            warnings.simplefilter("error", ConvergenceWarning)  # the baseline must converge to count
            return model.fit(x_train, y_train)

    timed = paired(fit_probecore, fit_sklearn, rounds)
    probe, model = timed.candidate_result, timed.baseline_result
    scaler, logistic = model[0], model[-1]

    probe_error = probe.evaluate(x_test, y_test).error
    sklearn_error = float(np.mean(model.predict(x_test) != y_test))
    standardized = ((x_train - probe.mean) / probe.scale).astype(np.float32)
    probe_objective = objective(standardized, y_train, probe.weights, probe.bias, options.l2)
    sklearn_objective = objective(
        scaler.transform(x_train), y_train, logistic.coef_.T, logistic.intercept_, options.l2
    )
    record(
        {
            "n_train": len(y_train),
            "n_features": x_train.shape[1],
            "probecore_s": round(timed.candidate_min, 3),
            "sklearn_s": round(timed.baseline_min, 3),
            "time_ratio_probecore_over_sklearn": round(timed.candidate_min / timed.baseline_min, 3),
            "probecore_test_error": round(probe_error, 4),
            "sklearn_test_error": round(sklearn_error, 4),
            "probecore_iters": probe.n_iter,
            "probecore_stop": probe.stop_reason,
            "sklearn_iters": int(logistic.n_iter_[0]),
            "probecore_objective": round(probe_objective, 6),
            "sklearn_objective": round(sklearn_objective, 6),
            **{f"timing_{key}": value for key, value in timed.figures().items()},
        }
    )

    message = f"probecore test error {probe_error:.4f} vs scikit-learn {sklearn_error:.4f} on {workload}"
    assert abs(probe_error - sklearn_error) <= ERROR_TOLERANCE, message  # same objective: same classifier
    assert probe_objective <= sklearn_objective * (1 + OBJECTIVE_SLACK), (
        f"probecore stopped at objective {probe_objective:.6f}, scikit-learn reached {sklearn_objective:.6f}"
    )


@pytest.mark.benchmark(group="fit-blas-threads")
@pytest.mark.parametrize("workload", ["convnet-relu3", "convnet-pool1"])
def test_fit_blas_threads(workload, mnist, convnet_features, synthetic_split, paired, record):
    """``FitOptions().blas_threads`` (1: BLAS capped at one thread while fitting) against ``blas_threads=None``.

    Not a comparison with scikit-learn: the same probe fit (its default path) under both settings, to show
    how much of the fitter's time the many small BLAS calls of L-BFGS lose to thread hand-off.
    """
    data = _workload(workload, mnist, convnet_features, synthetic_split)
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = data["train"], data["valid"], data["test"]
    capped = probecore.FitOptions()
    if getattr(capped, "blas_threads", None) is None:
        pytest.skip("FitOptions() does not cap BLAS threads")
    uncapped = dataclasses.replace(capped, blas_threads=None)

    timed = paired(
        lambda: probecore.fit_probe(x_train, y_train, N_CLASSES, x_valid, y_valid, capped),
        lambda: probecore.fit_probe(x_train, y_train, N_CLASSES, x_valid, y_valid, uncapped),
        3,
    )
    with_cap, without_cap = timed.candidate_result, timed.baseline_result
    cap_error, no_cap_error = with_cap.evaluate(x_test, y_test).error, without_cap.evaluate(x_test, y_test).error
    record(
        {
            "n_features": x_train.shape[1],
            "blas_threads": capped.blas_threads,
            "capped_s": round(timed.candidate_min, 3),
            "uncapped_s": round(timed.baseline_min, 3),
            "time_ratio_capped_over_uncapped": round(timed.candidate_min / timed.baseline_min, 3),
            "capped_iters": with_cap.n_iter,
            "uncapped_iters": without_cap.n_iter,
            "capped_test_error": round(cap_error, 4),
            "uncapped_test_error": round(no_cap_error, 4),
        }
    )
    assert abs(cap_error - no_cap_error) <= ERROR_TOLERANCE
