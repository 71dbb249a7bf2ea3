"""One loss-and-gradient evaluation against the machine's limits, and against the kernels it replaced.

Issue 14: one evaluation of the mean softmax cross-entropy and its gradient (``SoftmaxLoss.value_and_grad``,
``kernel="auto"``, one thread) should run at >= 50 % of the lower of two limits measured in the same run:

- the single-precision GEMM rate: numpy float32 matmul of two 2048 x 2048 matrices, BLAS on one thread,
  2 * 2048^3 flops / its time;
- the memory bound: the features read once, at the streaming read rate (numpy summing a 1 GiB float32
  array), as flops: 4 N d C / (4 N d bytes / rate) = C * rate. It is the lower one only for C < 5 or so.

An evaluation counts 4 N d C flops (2 N d C for the logits, as many for the gradient). Per shape, in the
same rounds (the ``paired`` fixture: the baselines, then the candidate, every round): the candidate, the old
fused kernel (copied below as it was, each block's products through BLAS, with its old wrapper:
float32 copies of the parameters, a concatenated gradient) and the two-pass BLAS version
(``kernel="blas"``), BLAS capped at one thread. The ratio to the lower limit uses the fastest round.
``cpu_percent_of_limit`` is the same ratio by the thread's CPU time, limits included: on a shared machine
the wall clock also counts the time other processes had the core, the CPU time does not. Guard: the candidate's loss and gradient equal a float64 numpy evaluation (loss to 1e-5 relative, gradient
to 1e-4 of its largest entry). ``test_value_and_grad_wrapper`` times what the Python around the kernel
costs. ``--benchmark-disable`` (quick mode) keeps each shape's d and C but at most 2000 rows, and measures
the limits on smaller arrays: a smoke test, figures not to be quoted.
"""

from __future__ import annotations

import os
import time

import numba
import numpy as np
import pytest

from probecore.probe import FitOptions, blas_limits, fit_probe
from probecore.softmax import SoftmaxLoss, prefers_fused
from probecore import softmax_kernel

# (N, d, C): the shapes (the bundled convnet's pixels and relu1 layer, ResNet-like pooled blocks,
# a binary probe on wide features, many classes), then small d, where the softmax's N x C work weighs most.
SHAPES = [
    (3500, 784, 10), (3500, 3200, 10), (20000, 512, 10), (20000, 2048, 10), (20000, 2048, 100),
    (50000, 4096, 2), (5000, 512, 1000), (20000, 256, 32), (20000, 256, 2), (20000, 128, 10), (20000, 64, 10),
]  # fmt: skip
QUICK_ROWS = 2000
L2 = 1e-3


# --- the kernel this one replaced, kept as the baseline -------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def old_fused_loss_grad(features, labels, weights, bias, grad_weights, grad_bias):
    """The previous ``softmax_kernel.softmax_loss_grad``: blocks of 1 MiB of rows, logits and gradient of
    each block by two BLAS products, softmax in scalar loops."""
    n_samples, n_features = features.shape
    n_classes = weights.shape[1]
    block = max(16, min(1024, 1024 * 1024 // (4 * n_features)))
    grad_weights[:] = 0.0
    grad_bias[:] = 0.0
    total = 0.0
    for start in range(0, n_samples, block):
        stop = min(start + block, n_samples)
        rows = features[start:stop]
        residual = np.dot(rows, weights)
        for r in range(stop - start):
            largest = -np.inf
            for c in range(n_classes):
                residual[r, c] += bias[c]
                largest = max(largest, residual[r, c])
            label = labels[start + r]
            label_logit = residual[r, label]
            norm = 0.0
            for c in range(n_classes):
                residual[r, c] = np.exp(residual[r, c] - largest)
                norm += residual[r, c]
            total += np.log(norm) + largest - label_logit
            inverse = np.float32(1.0 / norm)
            for c in range(n_classes):
                residual[r, c] *= inverse
                grad_bias[c] += residual[r, c]
            residual[r, label] -= 1.0
            grad_bias[label] -= 1.0
        grad_weights += np.dot(rows.T, residual)
    grad_weights /= n_samples
    grad_bias /= n_samples
    return total / n_samples


def old_value_and_grad(loss: SoftmaxLoss, params: np.ndarray, kernel=old_fused_loss_grad):
    """The previous ``SoftmaxLoss.value_and_grad`` around the old kernel."""
    n_weights = loss.features.shape[1] * loss.n_classes
    weights, bias = loss.unpack(params)
    grad_weights = np.empty(weights.shape)
    grad_bias = np.empty(loss.n_classes)
    value = kernel(loss.features, loss.labels, weights, bias, grad_weights, grad_bias)
    flat_weights = params[:n_weights]
    penalty = 0.5 * loss.l2 * float(np.dot(flat_weights, flat_weights))
    return value + penalty, np.concatenate([grad_weights.ravel() + loss.l2 * flat_weights, grad_bias])


# --- limits and the float64 reference ------------------------------------------------------------------------

_LIMITS: dict[bool, dict] = {}


def machine_limits(quick: bool) -> dict:
    """sgemm GFLOP/s and streaming read GB/s on one thread, measured once per run (smaller when quick), by
    the wall clock and by the thread's CPU time (which leaves out the time other processes had the core)."""
    if quick not in _LIMITS:
        size, read_bytes, rounds = (1024, 2**26, 2) if quick else (2048, 2**30, 5)
        with blas_limits(1):
            a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
            a @ a
            sgemm = [_both_clocks(lambda: a @ a) for _ in range(rounds)]
        values = np.ones(read_bytes // 4, np.float32)  # written once, so the pages exist before timing
        read = [_both_clocks(values.sum) for _ in range(rounds)]
        _LIMITS[quick] = {
            "sgemm_gflops": round(2 * size**3 / min(wall for wall, _ in sgemm) / 1e9, 1),
            "read_gbytes_per_s": round(read_bytes / min(wall for wall, _ in read) / 1e9, 2),
            "cpu_sgemm_gflops": round(2 * size**3 / min(cpu for _, cpu in sgemm) / 1e9, 1),
            "cpu_read_gbytes_per_s": round(read_bytes / min(cpu for _, cpu in read) / 1e9, 2),
        }
    return _LIMITS[quick]


def _seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _both_clocks(function) -> tuple[float, float]:
    """Wall and thread CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    function()
    return time.perf_counter() - wall, time.thread_time() - cpu


def _limit(flops: float, seconds: float, n_classes: int, sgemm: float, read: float) -> tuple[str, float, float]:
    """Which limit binds, its GFLOP/s, and the percentage of it that ``flops`` in ``seconds`` reach."""
    memory_bound = n_classes * read  # GFLOP/s when the features are read once: 4 N d C flops per 4 N d bytes
    limit = min(sgemm, memory_bound)
    return ("sgemm" if sgemm <= memory_bound else "memory"), memory_bound, 100 * flops / seconds / 1e9 / limit


def float64_objective(features, labels, params, n_classes, l2, chunk=4096):
    """The objective and its gradient in float64 numpy, rows in chunks (the largest shape is 800 MB)."""
    n_samples, n_features = features.shape
    weights = params[: n_features * n_classes].reshape(n_features, n_classes)
    bias = params[n_features * n_classes :]
    loss, grad_weights, grad_bias = 0.0, np.zeros_like(weights), np.zeros(n_classes)
    for start in range(0, n_samples, chunk):
        rows = features[start : start + chunk].astype(np.float64)
        logits = rows @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=1))
        picked = np.arange(len(rows)), labels[start : start + chunk]
        loss += (log_norm - logits[picked]).sum()
        residual = np.exp(logits - log_norm[:, None])
        residual[picked] -= 1.0
        grad_weights += rows.T @ residual
        grad_bias += residual.sum(axis=0)
    loss = loss / n_samples + 0.5 * l2 * float((weights**2).sum())
    return loss, np.concatenate([(grad_weights / n_samples + l2 * weights).ravel(), grad_bias / n_samples])


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _problem(n, d, c):
    rng = np.random.default_rng([n, d, c])
    features = rng.standard_normal((n, d), dtype=np.float32)
    labels = rng.integers(0, c, n)
    params = rng.standard_normal(d * c + c) * 0.05
    return features, labels, params


# --- benchmarks --------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="softmax-kernel")
@pytest.mark.parametrize("n, d, c", SHAPES, ids=[f"{n}x{d}-C{c}" for n, d, c in SHAPES])
def test_evaluation_against_limits(n, d, c, paired, record, benchmark):
    quick = benchmark.disabled
    if quick:
        n = min(n, QUICK_ROWS)
    elif 3 * n * d * 4 > _available_bytes():  # features, plus room for a float64 chunk and the baselines
        pytest.skip(f"{n} x {d} float32 features need more memory than is free")
    limits = machine_limits(quick)
    features, labels, params = _problem(n, d, c)
    auto = SoftmaxLoss(features, labels, c, L2)  # kernel="auto"
    blas = SoftmaxLoss(features, labels, c, L2, kernel="blas")
    old_seconds, blas_seconds = [], []

    def baselines():
        started = time.perf_counter()
        old = old_value_and_grad(auto, params)
        old_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        two_pass = blas.value_and_grad(params)
        blas_seconds.append(time.perf_counter() - started)
        return old, two_pass

    cpu_seconds = []

    def candidate():
        started = time.thread_time()
        result = auto.value_and_grad(params)
        cpu_seconds.append(time.thread_time() - started)
        return result

    with blas_limits(1):
        auto.value_and_grad(params)  # compile / load the kernels before timing
        baselines()
        old_seconds.clear()
        blas_seconds.clear()
        rounds = 15 if n * d * c < 2 * 10**8 else 7
        measured = paired(candidate, baselines, rounds)

    value, grad = measured.candidate_result
    ref_value, ref_grad = float64_objective(features, labels, params, c, L2)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-4 * np.abs(ref_grad).max())
    (old_value, old_grad), (blas_value, _) = measured.baseline_result
    np.testing.assert_allclose([old_value, blas_value], ref_value, rtol=1e-5)

    flops = 4 * n * d * c
    new_s, old_s, blas_s = measured.candidate_min, min(old_seconds), min(blas_seconds)
    limit, memory_bound, percent = _limit(flops, new_s, c, limits["sgemm_gflops"], limits["read_gbytes_per_s"])
    cpu_limits = limits["cpu_sgemm_gflops"], limits["cpu_read_gbytes_per_s"]
    cpu_percent = _limit(flops, min(cpu_seconds), c, *cpu_limits)[2]
    record(
        {
            "shape": f"{n}x{d}, C={c}",
            "kernel": auto.kernel,
            "new_ms": round(new_s * 1e3, 3),
            "new_gflops": round(flops / new_s / 1e9, 1),
            "old_fused_ms": round(old_s * 1e3, 3),
            "old_fused_gflops": round(flops / old_s / 1e9, 1),
            "blas_ms": round(blas_s * 1e3, 3),
            "blas_gflops": round(flops / blas_s / 1e9, 1),
            **limits,
            "memory_bound_gflops": round(memory_bound, 1),
            "limit": limit,
            "percent_of_limit": round(percent, 1),
            "cpu_ms": round(min(cpu_seconds) * 1e3, 3),
            "cpu_percent_of_limit": round(cpu_percent, 1),
            "speedup_vs_old_fused": round(old_s / new_s, 2),
            "auto_picks": "fused" if prefers_fused(n, d, c) else "blas",
            **measured.figures(),
        }
    )


def _no_kernel(features, labels, weights, bias, l2, grad_weights, grad_bias):
    """Writes its outputs, as the kernel does (arithmetic on the uninitialized memory of ``np.empty`` can
    meet subnormal numbers and crawl), and nothing else."""
    grad_weights[...] = 0.0
    grad_bias[...] = 0.0
    return 0.0


def _old_no_kernel(features, labels, weights, bias, grad_weights, grad_bias):
    return _no_kernel(features, labels, weights, bias, 0.0, grad_weights, grad_bias)


def _no_sums(*arguments):
    """``softmax_kernel.softmax_sums`` (and its transposed twin) doing nothing but write its outputs, the last two
    arguments (see ``_no_kernel``)."""
    sums, bias_sums = arguments[-2:]
    sums[...] = 0.0
    bias_sums[...] = 0.0
    return 0.0


WRAPPER_SHAPES = [(3500, 128, 10), (3500, 784, 10), (20000, 2048, 10), (5000, 512, 100)]


@pytest.mark.benchmark(group="softmax-wrapper")
@pytest.mark.parametrize("n, d, c", WRAPPER_SHAPES, ids=[f"{n}x{d}-C{c}" for n, d, c in WRAPPER_SHAPES])
def test_value_and_grad_wrapper(n, d, c, paired, record, monkeypatch):
    """The Python around the kernel alone: ``value_and_grad`` (with the weights' preparation and the gradient's
    finish, which it runs once around the kernel's row sums) and the old wrapper, with a kernel that does
    nothing, against the time of the kernel itself."""
    features, labels, params = _problem(n, d, c)
    loss = SoftmaxLoss(features, labels, c, L2, kernel="fused")
    if loss._transposed_blocks is None:
        kernel, layout = softmax_kernel.softmax_loss_grad, loss.features
    else:
        kernel, layout = softmax_kernel.softmax_loss_grad_transposed, loss._transposed_blocks
    weights, bias = params[: d * c].reshape(d, c), params[d * c :]
    grad_weights, grad_bias = np.empty((d, c)), np.empty(c)

    def bare_kernel():
        return kernel(layout, loss.labels, weights, bias, L2, grad_weights, grad_bias)

    bare_kernel()
    kernel_s = min(_seconds(bare_kernel) for _ in range(5))
    monkeypatch.setattr(softmax_kernel, "softmax_sums", _no_sums)
    monkeypatch.setattr(softmax_kernel, "softmax_sums_transposed", _no_sums)
    old = lambda: old_value_and_grad(loss, params, _old_no_kernel)  # noqa: E731
    measured = paired(lambda: loss.value_and_grad(params), old, 200)
    record(
        {
            "shape": f"{n}x{d}, C={c}",
            "kernel_ms": round(kernel_s * 1e3, 3),
            "wrapper_us": round(measured.candidate_min * 1e6, 1),
            "old_wrapper_us": round(measured.baseline_min * 1e6, 1),
            "wrapper_percent_of_kernel": round(100 * measured.candidate_min / kernel_s, 2),
            **measured.figures(),
        }
    )


ITERATION_SHAPES = [shape for shape in SHAPES if shape[0] * shape[1] * shape[2] >= 10**7]
ITERATION_L2 = 1e-4
SHORT_FIT, LONG_FIT = 10, 40  # iterations: the difference of the two fits' times is LONG - SHORT iterations


@pytest.mark.benchmark(group="lbfgs-iteration")
@pytest.mark.parametrize("n, d, c", ITERATION_SHAPES, ids=[f"{n}x{d}-C{c}" for n, d, c in ITERATION_SHAPES])
def test_iteration_against_limits(n, d, c, paired, record, monkeypatch, benchmark):
    """A whole L-BFGS iteration through ``fit_probe`` (one thread; the line search, the two-loop recursion, the
    preconditioner and the copies included), as GFLOP/s of the one evaluation an iteration needs, against the
    same limits. Setup (standardization, preconditioner) cancels out: the time of a 10-iteration fit is
    subtracted from that of a 40-iteration fit, both from zero with ``tol=0`` (per iteration actually run: a
    fit that reaches the float32 loss's resolution first ends early). The features are correlated as a layer's
    activations are (32 shared latent factors plus noise: independent Gaussian features make an easy problem
    that reaches float32 resolution within 15 iterations, where every line search then fails), the labels
    from a noisy linear teacher on the factors, so the fit has something to learn."""
    quick = benchmark.disabled
    short_fit, long_fit = (2, 6) if quick else (SHORT_FIT, LONG_FIT)
    if quick:
        n = min(n, max(QUICK_ROWS, 2 * d))  # more rows than features, as in the full run
    limits = machine_limits(quick)
    rng = np.random.default_rng([9, n, d, c])
    factors = rng.standard_normal((n, 32), dtype=np.float32)
    features = factors @ rng.standard_normal((32, d), dtype=np.float32) + rng.standard_normal((n, d), dtype=np.float32)
    teacher = rng.standard_normal((32, c), dtype=np.float32)
    labels = (factors @ teacher + rng.gumbel(size=(n, c))).argmax(axis=1)
    evaluations = []
    counting = SoftmaxLoss.value_and_grad

    def counted(self, params):
        evaluations.append(1)
        return counting(self, params)

    monkeypatch.setattr(SoftmaxLoss, "value_and_grad", counted)

    def fit(iterations):
        options = FitOptions(l2=ITERATION_L2, max_iter=iterations, tol=0, threads=1)
        return fit_probe(features, labels, c, options=options)

    fit(2)  # compile and warm up
    short = lambda: fit(short_fit)  # noqa: E731
    evaluations.clear()
    measured = paired(lambda: fit(long_fit), short, 1 if quick else 3)
    rounds = measured.figures()["rounds"]
    long_probe, short_probe = measured.candidate_result, measured.baseline_result
    iterations = long_probe.n_iter - short_probe.n_iter
    enough = min(8, long_fit - short_fit)  # iterations between the two fits: a binary fit reaches float32's resolution in ~20
    assert short_probe.n_iter == short_fit and iterations >= enough, (long_probe.path, short_probe.path)
    seconds = (measured.candidate_min - measured.baseline_min) / iterations
    flops = 4 * n * d * c
    limit, _, percent = _limit(flops, seconds, c, limits["sgemm_gflops"], limits["read_gbytes_per_s"])
    record(
        {
            "shape": f"{n}x{d}, C={c}",
            "ms_per_iteration": round(seconds * 1e3, 3),
            "gflops_per_iteration": round(flops / seconds / 1e9, 1),
            "iterations": iterations,
            "evaluations_per_iteration": round(len(evaluations) / rounds / (long_probe.n_iter + short_fit), 3),
            **limits,
            "limit": limit,
            "percent_of_limit": round(percent, 1),
            **measured.figures(),
        }
    )
