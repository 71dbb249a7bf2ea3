"""A spectral preconditioner for the probe fit: the few directions in which the features vary most.

Standardized activations are strongly correlated (a feature map's channels share a common mode), so the
loss's curvature along the top eigenvectors of ``X'X / N`` is hundreds of times that along the rest, and
L-BFGS spends most of its iterations on that spread. Starting L-BFGS from ``M``, which shrinks each of the
top ``k`` directions towards the curvature of the ``k+1``-th, as its guess of the inverse Hessian removes
most of it, for the price of a randomized eigendecomposition (a few passes over the features) and two
``(d, k)`` products per iteration (``project`` and ``apply``). The objective and its optimum are unchanged:
only the path L-BFGS takes to it (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RANK = 128  # directions shrunk: 256 and 512 took fewer iterations only with a weaker EXPONENT, and cost more
# per iteration than they saved
# M shrinks by (curvature ratio)^EXPONENT: 1 would equalize X'X's top directions with the rest, but the loss's
# Hessian weighs samples by how uncertain the probe is on them, so X'X overstates the spread. 0.8 took the
# fewest iterations on the demo's relu1, pool1 and pool2 (936 against 1018 at 1, 956 at 0.7, 1525 at 1.3)
# and on ResNet-shaped layers (478 against 537 at 1).
EXPONENT = 0.8
OVERSAMPLE = 10
POWER_ITERATIONS = 2


@dataclass(frozen=True)
class SpectralPreconditioner:
    """``M = I + V (s - 1) V'`` with ``s = ((floor + l2) / (eigenvalues + l2)) ** EXPONENT``: symmetric, positive
    definite."""

    vectors: np.ndarray  # (d, k) orthonormal, float32 (the products are thin: memory-bound on these)
    eigenvalues: np.ndarray  # (k,) of X'X / N, descending
    floor: float  # the (k+1)-th eigenvalue: where the shrunk directions end up

    @classmethod
    def of(
        cls, features: np.ndarray, seed: int = 0, products: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> SpectralPreconditioner | None:
        """The preconditioner for (N, d) float32 ``features`` (standardized), from randomized subspace iteration
        on ``X'X``; None where no direction stands out. ``products(B)`` computes ``X'(X B)`` (float32) where the
        features are kept elsewhere (on a GPU: ``onnx_fit.OrtSoftmaxLoss.gram_product``); else numpy does."""
        n_samples, n_features = features.shape
        rank = RANK
        if n_features < 2 * rank:  # narrow layers: measured slower with it (relu3, 128 features: 137 -> 411
            return None  # iterations), as the directions left unshrunk are no longer a small spread
        rng = np.random.default_rng(seed)
        basis = rng.standard_normal((n_features, min(rank + OVERSAMPLE, n_features)), dtype=np.float32)
        for _ in range(POWER_ITERATIONS):
            basis, _ = np.linalg.qr(features.T @ (features @ basis) if products is None else products(basis))
        if products is None:
            projected = (features @ basis).astype(np.float64)
            gram = projected.T @ projected
        else:  # B'X'XB: the same matrix from one more product where the features are
            gram = basis.T.astype(np.float64) @ products(basis).astype(np.float64)
        eigenvalues, rotation = np.linalg.eigh(gram / n_samples)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, rotation = eigenvalues[order], rotation[:, order]
        floor = float(eigenvalues[rank]) if rank < len(eigenvalues) else 1.0
        top = eigenvalues[:rank] > floor
        if not top.any():
            return None
        vectors = (basis.astype(np.float64) @ rotation[:, :rank][:, top]).astype(np.float32)
        return cls(vectors, eigenvalues[:rank][top], floor)

    def scales(self, l2: float) -> np.ndarray:
        return ((self.floor + l2) / (self.eigenvalues + l2)) ** EXPONENT

    def project(self, matrix: np.ndarray) -> np.ndarray:
        """``V' matrix`` (k, C) in float64 for a (d, C) matrix: all that ``apply`` and ``excess`` need of it
        besides the matrix itself (float32 product, as precise as the loss it feeds)."""
        return (self.vectors.T @ matrix.astype(np.float32)).astype(np.float64)

    def apply(self, matrix: np.ndarray, scales: np.ndarray, projected: np.ndarray) -> np.ndarray:
        """``M @ matrix`` for a (d, C) float64 matrix, ``M`` with these ``scales`` (``scales(l2)``), given
        ``projected = project(matrix)``."""
        return matrix + self.vectors @ ((scales - 1)[:, None] * projected).astype(np.float32)

    @staticmethod
    def excess(projected: np.ndarray, scales: np.ndarray) -> float:
        """``sum(matrix * (M @ matrix)) - sum(matrix ** 2)``, what ``M`` adds to the squared norm, given
        ``projected = project(matrix)``."""
        return float(((scales - 1)[:, None] * projected * projected).sum())
