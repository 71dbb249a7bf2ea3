"""The fused softmax kernel against the two-pass BLAS loss, one evaluation (loss and gradient) per round.

Both are ``probecore.softmax.SoftmaxLoss.value_and_grad`` on the same standardized-looking float32 features
and parameters, one with ``kernel="fused"`` (``softmax_kernel``: each block of rows read once) and one
with ``kernel="blas"`` (two whole-matrix products), under the BLAS cap fits run with
(``FitOptions().blas_threads``). The ratio fused / blas below 1 means the fused kernel is faster; the
``auto`` choice (``softmax.prefers_fused``) is recorded next to it, to check the rule against the figures.
Guard: both give the same loss and gradient (float32 rounding).
"""

from __future__ import annotations

import numpy as np
import pytest

import probecore
from probecore.probe import blas_limits
from probecore.softmax import SoftmaxLoss, prefers_fused

# (N, d, C): probe-sized problems, from the bundled convnet's to ResNet-50-like pooled features
SHAPES = [
    (3500, 128, 10), (3500, 1568, 10), (20000, 256, 2), (20000, 256, 10), (20000, 2048, 10),
    (20000, 256, 32), (20000, 256, 100), (20000, 2048, 100), (5000, 512, 1000),
]  # fmt: skip


@pytest.mark.benchmark(group="softmax-kernel")
@pytest.mark.parametrize("n, d, c", SHAPES, ids=[f"{n}x{d}-C{c}" for n, d, c in SHAPES])
def test_fused_vs_two_pass(n, d, c, paired, record):
    rng = np.random.default_rng([n, d, c])
    features = rng.standard_normal((n, d), dtype=np.float32)
    labels = rng.integers(0, c, n)
    params = rng.standard_normal(d * c + c) * 0.05
    fused = SoftmaxLoss(features, labels, c, 1e-3, kernel="fused")
    blas = SoftmaxLoss(features, labels, c, 1e-3, kernel="blas")
    with blas_limits(probecore.FitOptions().blas_threads):
        fused.value_and_grad(params)  # compile / load before timing
        rounds = 20 if n * d * c < 10**8 else 5
        measured = paired(lambda: fused.value_and_grad(params), lambda: blas.value_and_grad(params), rounds)
    (loss_fused, grad_fused), (loss_blas, grad_blas) = measured.candidate_result, measured.baseline_result
    assert loss_fused == pytest.approx(loss_blas, rel=1e-5)
    np.testing.assert_allclose(grad_fused, grad_blas, rtol=1e-3, atol=1e-5 * np.abs(grad_blas).max())
    record(
        {
            "shape": f"{n}x{d}, C={c}",
            "fused_ms": round(measured.candidate_min * 1e3, 3),
            "blas_ms": round(measured.baseline_min * 1e3, 3),
            "ratio_fused_over_blas": round(measured.candidate_min / measured.baseline_min, 3),
            "auto_picks": "fused" if prefers_fused(n, d, c) else "blas",
            **measured.figures(),
        }
    )
