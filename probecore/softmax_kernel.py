"""The fused softmax cross-entropy kernel: loss and gradient in one pass over the features.

The two-pass version (``SoftmaxLoss`` with ``kernel="blas"``) reads the whole (N, d) feature matrix twice
per evaluation, once for the logits and once for the gradient; at probe sizes that is memory traffic, not
arithmetic. Here each block of rows small enough to stay in cache is read from memory once: its logits
(one small BLAS product), softmax, loss and residual, then its share of the gradient (a second product on
the same, now cached, rows). Products are float32; the loss and the gradient are summed in float64.
Compiled with ``nogil``, so several probes can be fitted at once in threads (``probe.fit_probes``).
"""

import numba
import numpy as np

# Rows per block: the block's features stay in cache (1 MiB; L2 is 0.5 to 2 MiB a core) between its two
# products, and the products stay large enough for BLAS to run at speed (benchmarks/README.md).
BLOCK_BYTES = 1024 * 1024
# fastmath without nnan/ninf: reassociation and vectorized exp/log, but inf and NaN still mean what they say.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def softmax_loss_grad(features, labels, weights, bias, grad_weights, grad_bias):
    """Mean cross-entropy of ``softmax(features @ weights + bias)``; writes its gradient in place.

    features (N, d) float32 C-contiguous; labels (N,) int64; weights (d, C) and bias (C,) float32;
    grad_weights (d, C) and grad_bias (C,) float64, overwritten. Returns the loss as a float.
    """
    n_samples, n_features = features.shape
    n_classes = weights.shape[1]
    block = max(16, min(1024, BLOCK_BYTES // (4 * n_features)))
    grad_weights[:] = 0.0
    grad_bias[:] = 0.0
    total = 0.0
    for start in range(0, n_samples, block):
        stop = min(start + block, n_samples)
        rows = features[start:stop]
        residual = np.dot(rows, weights)  # (rows, C) logits, overwritten by softmax - onehot
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
