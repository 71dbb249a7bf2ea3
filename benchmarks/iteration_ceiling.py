"""How much faster than scikit-learn one L-BFGS iteration can be on this machine, against how much it is.

One thread each, one shape (default 20 000 x 2048, C = 100: the widest layer of the ResNet-50-shaped workload
at C = 100). An iteration needs one evaluation of loss and gradient, two products of 2 N d C flops each.
scikit-learn computes them in float64, probecore in float32, so per iteration probecore can be at most about
(sgemm rate / scikit-learn's iteration rate) times faster, whatever its kernels do: the *ceiling*. Measured
here in one run: sgemm and dgemm (2048 x 2048 matrices), scikit-learn's ``LogisticRegression(solver="lbfgs")``
and probecore's ``fit_probe`` per iteration (the time of a 15-iteration fit less that of a 5-iteration one,
both from zero, divided by the iterations between them).

    python benchmarks/iteration_ceiling.py [--n 20000 --d 2048 --classes 100]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

SHORT, LONG = 5, 15


def _best_seconds(run, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def gemm_gflops(dtype) -> float:
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(dtype)
    a @ a
    return 2 * 2048**3 / _best_seconds(lambda: a @ a, 5) / 1e9


def problem(n: int, d: int, classes: int):
    """Correlated features (32 latent factors plus noise, standardized) and labels from a noisy teacher: the
    kind of problem ``test_softmax_kernel.test_iteration_against_limits`` fits."""
    rng = np.random.default_rng([9, n, d, classes])
    factors = rng.standard_normal((n, 32), dtype=np.float32)
    features = factors @ rng.standard_normal((32, d), dtype=np.float32) + rng.standard_normal((n, d), dtype=np.float32)
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    labels = (factors @ rng.standard_normal((32, classes), dtype=np.float32) + rng.gumbel(size=(n, classes))).argmax(axis=1)
    return features, labels


def sklearn_seconds_per_iteration(features: np.ndarray, labels: np.ndarray, l2: float) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = features.astype(np.float64)  # what scikit-learn computes in

    def fit(iterations):
        model = LogisticRegression(C=1 / (l2 * len(labels)), max_iter=iterations, tol=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, labels)
        assert int(model.n_iter_[0]) == iterations, model.n_iter_
        return model

    fit(2)
    return (_best_seconds(lambda: fit(LONG), 2) - _best_seconds(lambda: fit(SHORT), 2)) / (LONG - SHORT)


def probecore_seconds_per_iteration(features: np.ndarray, labels: np.ndarray, classes: int, l2: float) -> float:
    from probecore.probe import FitOptions, fit_probe

    def fit(iterations):
        probe = fit_probe(features, labels, classes, options=FitOptions(l2=l2, max_iter=iterations, tol=0, threads=1))
        assert probe.n_iter == iterations, probe.path
        return probe

    fit(2)
    return (_best_seconds(lambda: fit(LONG), 2) - _best_seconds(lambda: fit(SHORT), 2)) / (LONG - SHORT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--l2", type=float, default=1e-4)
    args = parser.parse_args()

    import scipy.linalg  # noqa: F401  (scipy's own BLAS, capped with numpy's)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        features, labels = problem(args.n, args.d, args.classes)
        sgemm, dgemm = gemm_gflops(np.float32), gemm_gflops(np.float64)
        sklearn_s = sklearn_seconds_per_iteration(features, labels, args.l2)
        probecore_s = probecore_seconds_per_iteration(features, labels, args.classes, args.l2)
    flops = 4 * args.n * args.d * args.classes
    at_sgemm = flops / (sgemm * 1e9)
    print(
        json.dumps(
            {
                "shape": f"{args.n}x{args.d}, C={args.classes}",
                "sgemm_gflops": round(sgemm, 1),
                "dgemm_gflops": round(dgemm, 1),
                "sklearn_s_per_iteration": round(sklearn_s, 4),
                "sklearn_gflops": round(flops / sklearn_s / 1e9, 1),
                "probecore_s_per_iteration": round(probecore_s, 4),
                "probecore_gflops": round(flops / probecore_s / 1e9, 1),
                "one_evaluation_at_sgemm_s": round(at_sgemm, 4),
                "ceiling_per_iteration": round(sklearn_s / at_sgemm, 2),
                "measured_per_iteration": round(sklearn_s / probecore_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
