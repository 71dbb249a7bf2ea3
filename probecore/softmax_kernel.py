"""The fused softmax cross-entropy kernels: loss and gradient in one pass over the features.

With few classes each feature value carries only 4 C flops (2 C for the logits, 2 C for the gradient), so
BLAS sees thin products (N x d times d x 10) it cannot run at speed, and the two-pass version reads the
features twice. ``softmax_loss_grad`` takes the rows in blocks that stay in cache (``BLOCK_BYTES``); for
each block:

1. logits: register tiles of 4 rows x 4 (or 3, 2, 1) classes, an inner loop over contiguous ``d`` that LLVM
   vectorizes with the 16 partial sums in vector registers (the weights transposed to (C, d));
2. softmax, loss and residual of the block's rows, class-major (C, rows) so that every loop runs along the
   rows and vectorizes, exp included (``_exp_nonpositive``: numba's own calls libm one value at a time);
3. gradient: the same tiles the other way round, each pass over a gradient row adding 4 feature rows at
   once, while the block is still in cache. Partial sums are float32 over at most ``FLUSH_ROWS`` rows,
   then added in float64.

A kernel returns the sums over its rows (``softmax_sums``), so that an evaluation cut into row chunks
(``softmax.SoftmaxLoss``) prepares the weights once (``shifted_weights``), adds the chunks' sums, and turns
them into the mean and its gradient once (``finish``).

The softmax is unchanged by subtracting one class's logit from all of them, so the last class serves as the
reference: logits are computed for C - 1 classes with weights ``W[:, c] - W[:, C-1]``, and the last class's
gradient is minus the sum of the others (the residuals of a row sum to zero). At C = 2 that halves the work.
While a block is computed, the next one is prefetched (``prefetch``, LLVM's prefetch intrinsic), which hides
most of the memory latency when rows are short.

With few features (``softmax.transposed``: d <= 128) a row's dot products are too short for that to run at
speed, and ``softmax_loss_grad_transposed`` works on a copy of the features transposed block by block
(``transpose_blocks``, made once per fit): the same tiles then run along 1008 rows at a time. The kernels'
own (C, length) buffers have rows of an odd number of cache lines (``_row_stride``). Measurements, and
what did not help: benchmarks/README.md, "Softmax kernel against the machine's limits".

Compiled with ``nogil``, so several probes can be fitted at once in threads (``probe.fit_probes``); the
first call compiles for about 10 s (numba caches the result next to this file).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Rows per block: the block (256 KiB), the weights and the gradient partial sums stay in L2 (0.5 to 2 MiB
# a core) between the two passes, with room for the next block being prefetched.
BLOCK_BYTES = 256 * 1024
# float32 gradient partial sums cover at most this many rows before they are added to the float64 gradient.
FLUSH_ROWS = 256
# fastmath without nnan/ninf: reassociation (vectorized sums) and contraction (FMA), but inf and NaN still
# mean what they say.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
LOG2E = np.float32(1.4426950408889634)
LN2_HIGH = np.float32(0.693359375)  # ln 2 in two parts, the first exact in float32 (Cody and Waite)
LN2_LOW = np.float32(-2.12194440e-4)


@intrinsic
def prefetch(typingctx, array, row, col):
    """Hint the CPU to bring ``array[row, col]``'s cache line into cache (no fault, no effect on results)."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1], args[2]], wraparound=False)
        if getattr(pointer.type, "is_opaque", False):
            name = "llvm.prefetch.p0"
        else:  # LLVM before opaque pointers
            pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
            name = "llvm.prefetch.p0i8"
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, int32, int32, int32]), name
        )
        # read, locality 2 (keep in the outer caches), data cache
        builder.call(function, [pointer, ir.Constant(int32, 0), ir.Constant(int32, 2), ir.Constant(int32, 1)])
        return context.get_dummy_value()

    return types.void(array, row, col), codegen


# --- register tiles: 4 rows (i0..i3 of X) x 4, 3, 2 or 1 classes (c, c+1, ...) --------------------------
# Outputs and coefficients are class-major (C, rows). The same tiles serve both layouts: in the transposed
# one the "rows" of X are features and the per-row values are per-feature ones (see the two kernels).


@numba.njit(cache=True, nogil=True)
def _add_to_column(out, c, r, s0, s1, s2, s3):
    out[c, r] += s0
    out[c, r + 1] += s1
    out[c, r + 2] += s2
    out[c, r + 3] += s3


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _logits_4x4(X, i0, i1, i2, i3, W, c, out, r):
    """out[c:c+4, r:r+4] += (X[(i0, i1, i2, i3)] @ W[c:c+4].T).T: 16 sums, LLVM keeps them in vector registers"""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for j in range(X.shape[1]):
        a0, a1, a2, a3 = X[i0, j], X[i1, j], X[i2, j], X[i3, j]
        b0, b1, b2, b3 = W[c, j], W[c + 1, j], W[c + 2, j], W[c + 3, j]
        s00, s01, s02, s03 = s00 + a0 * b0, s01 + a0 * b1, s02 + a0 * b2, s03 + a0 * b3
        s10, s11, s12, s13 = s10 + a1 * b0, s11 + a1 * b1, s12 + a1 * b2, s13 + a1 * b3
        s20, s21, s22, s23 = s20 + a2 * b0, s21 + a2 * b1, s22 + a2 * b2, s23 + a2 * b3
        s30, s31, s32, s33 = s30 + a3 * b0, s31 + a3 * b1, s32 + a3 * b2, s33 + a3 * b3
    _add_to_column(out, c, r, s00, s10, s20, s30)
    _add_to_column(out, c + 1, r, s01, s11, s21, s31)
    _add_to_column(out, c + 2, r, s02, s12, s22, s32)
    _add_to_column(out, c + 3, r, s03, s13, s23, s33)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _logits_4x3(X, i0, i1, i2, i3, W, c, out, r):
    s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = s30 = s31 = s32 = np.float32(0.0)
    for j in range(X.shape[1]):
        a0, a1, a2, a3 = X[i0, j], X[i1, j], X[i2, j], X[i3, j]
        b0, b1, b2 = W[c, j], W[c + 1, j], W[c + 2, j]
        s00, s01, s02 = s00 + a0 * b0, s01 + a0 * b1, s02 + a0 * b2
        s10, s11, s12 = s10 + a1 * b0, s11 + a1 * b1, s12 + a1 * b2
        s20, s21, s22 = s20 + a2 * b0, s21 + a2 * b1, s22 + a2 * b2
        s30, s31, s32 = s30 + a3 * b0, s31 + a3 * b1, s32 + a3 * b2
    _add_to_column(out, c, r, s00, s10, s20, s30)
    _add_to_column(out, c + 1, r, s01, s11, s21, s31)
    _add_to_column(out, c + 2, r, s02, s12, s22, s32)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _logits_4x2(X, i0, i1, i2, i3, W, c, out, r):
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = np.float32(0.0)
    for j in range(X.shape[1]):
        a0, a1, a2, a3 = X[i0, j], X[i1, j], X[i2, j], X[i3, j]
        b0, b1 = W[c, j], W[c + 1, j]
        s00, s01, s10, s11 = s00 + a0 * b0, s01 + a0 * b1, s10 + a1 * b0, s11 + a1 * b1
        s20, s21, s30, s31 = s20 + a2 * b0, s21 + a2 * b1, s30 + a3 * b0, s31 + a3 * b1
    _add_to_column(out, c, r, s00, s10, s20, s30)
    _add_to_column(out, c + 1, r, s01, s11, s21, s31)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _logits_4x1(X, i0, i1, i2, i3, W, c, out, r):
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(X.shape[1]):
        b = W[c, j]
        s0, s1, s2, s3 = s0 + X[i0, j] * b, s1 + X[i1, j] * b, s2 + X[i2, j] * b, s3 + X[i3, j] * b
    _add_to_column(out, c, r, s0, s1, s2, s3)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _grad_4x4(X, i0, i1, i2, i3, R, r, G, c):
    """G[c:c+4] += R[c:c+4, r:r+4] @ X[(i0, i1, i2, i3)]: each pass over a row of G adds four rows of X"""
    q00, q01, q02, q03 = R[c, r], R[c + 1, r], R[c + 2, r], R[c + 3, r]
    q10, q11, q12, q13 = R[c, r + 1], R[c + 1, r + 1], R[c + 2, r + 1], R[c + 3, r + 1]
    q20, q21, q22, q23 = R[c, r + 2], R[c + 1, r + 2], R[c + 2, r + 2], R[c + 3, r + 2]
    q30, q31, q32, q33 = R[c, r + 3], R[c + 1, r + 3], R[c + 2, r + 3], R[c + 3, r + 3]
    for j in range(X.shape[1]):
        a0, a1, a2, a3 = X[i0, j], X[i1, j], X[i2, j], X[i3, j]
        G[c, j] += (a0 * q00 + a1 * q10) + (a2 * q20 + a3 * q30)
        G[c + 1, j] += (a0 * q01 + a1 * q11) + (a2 * q21 + a3 * q31)
        G[c + 2, j] += (a0 * q02 + a1 * q12) + (a2 * q22 + a3 * q32)
        G[c + 3, j] += (a0 * q03 + a1 * q13) + (a2 * q23 + a3 * q33)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _grad_4x3(X, i0, i1, i2, i3, R, r, G, c):
    q00, q01, q02 = R[c, r], R[c + 1, r], R[c + 2, r]
    q10, q11, q12 = R[c, r + 1], R[c + 1, r + 1], R[c + 2, r + 1]
    q20, q21, q22 = R[c, r + 2], R[c + 1, r + 2], R[c + 2, r + 2]
    q30, q31, q32 = R[c, r + 3], R[c + 1, r + 3], R[c + 2, r + 3]
    for j in range(X.shape[1]):
        a0, a1, a2, a3 = X[i0, j], X[i1, j], X[i2, j], X[i3, j]
        G[c, j] += (a0 * q00 + a1 * q10) + (a2 * q20 + a3 * q30)
        G[c + 1, j] += (a0 * q01 + a1 * q11) + (a2 * q21 + a3 * q31)
        G[c + 2, j] += (a0 * q02 + a1 * q12) + (a2 * q22 + a3 * q32)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _grad_4x2(X, i0, i1, i2, i3, R, r, G, c):
    q00, q01, q10, q11 = R[c, r], R[c + 1, r], R[c, r + 1], R[c + 1, r + 1]
    q20, q21, q30, q31 = R[c, r + 2], R[c + 1, r + 2], R[c, r + 3], R[c + 1, r + 3]
    for j in range(X.shape[1]):
        a0, a1, a2, a3 = X[i0, j], X[i1, j], X[i2, j], X[i3, j]
        G[c, j] += (a0 * q00 + a1 * q10) + (a2 * q20 + a3 * q30)
        G[c + 1, j] += (a0 * q01 + a1 * q11) + (a2 * q21 + a3 * q31)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _grad_4x1(X, i0, i1, i2, i3, R, r, G, c):
    q0, q1, q2, q3 = R[c, r], R[c, r + 1], R[c, r + 2], R[c, r + 3]
    for j in range(X.shape[1]):
        G[c, j] += (X[i0, j] * q0 + X[i1, j] * q1) + (X[i2, j] * q2 + X[i3, j] * q3)


@numba.njit(cache=True, nogil=True)
def _tile_width(remaining):
    """Classes in the next tile: fours, then threes (9 = 3 + 3 + 3 rather than 4 + 4 + 1: a one-class tile
    loads as much as it computes), a two or a one only for what is left of 1, 2 or 5."""
    if remaining >= 4 and remaining != 5 and remaining != 6 and remaining != 9:
        return 4
    return min(remaining, 3)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _logits_tiles(X, i0, i1, i2, i3, W, out, r):
    """out[:, r:r+4] += (X[(i0, i1, i2, i3)] @ W.T).T, all of W's rows in tiles"""
    c, n_classes = 0, W.shape[0]
    while c < n_classes:
        width = _tile_width(n_classes - c)
        if width == 4:
            _logits_4x4(X, i0, i1, i2, i3, W, c, out, r)
        elif width == 3:
            _logits_4x3(X, i0, i1, i2, i3, W, c, out, r)
        elif width == 2:
            _logits_4x2(X, i0, i1, i2, i3, W, c, out, r)
        else:
            _logits_4x1(X, i0, i1, i2, i3, W, c, out, r)
        c += width


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _grad_tiles(X, i0, i1, i2, i3, R, r, G):
    """G += R[:, r:r+4] @ X[(i0, i1, i2, i3)], all of G's rows in tiles"""
    c, n_classes = 0, G.shape[0]
    while c < n_classes:
        width = _tile_width(n_classes - c)
        if width == 4:
            _grad_4x4(X, i0, i1, i2, i3, R, r, G, c)
        elif width == 3:
            _grad_4x3(X, i0, i1, i2, i3, R, r, G, c)
        elif width == 2:
            _grad_4x2(X, i0, i1, i2, i3, R, r, G, c)
        else:
            _grad_4x1(X, i0, i1, i2, i3, R, r, G, c)
        c += width


@numba.njit(cache=True, nogil=True)
def _prefetch_rows(features, first, count):
    for row in range(first, min(first + count, features.shape[0])):
        for j in range(0, features.shape[1], 16):  # one 64-byte line holds 16 float32
            prefetch(features, row, j)


# --- softmax -----------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _exp_nonpositive(values, powers):
    """``values[i] = exp(values[i])`` in place for values <= 0, float32, relative error below 5e-7 (4 ulp).

    numba calls libm's ``expf`` one value at a time; this loop vectorizes: exp(x) = 2^k e^t with
    k = round(x / ln 2) and |t| <= ln(2) / 2, e^t by its degree-6 Taylor polynomial, 2^k built from its bits
    in ``powers`` (int32 scratch as long as ``values``). Below -87 (exp < 1.7e-38) the result is exp(-87).
    """
    for i in range(values.shape[0]):
        x = values[i]
        x = x if not x < np.float32(-87.0) else np.float32(-87.0)  # NaN stays NaN
        k = np.floor(x * LOG2E + np.float32(0.5))
        t = (x - k * LN2_HIGH) - k * LN2_LOW
        p = np.float32(1.0 / 720.0)
        p = p * t + np.float32(1.0 / 120.0)
        p = p * t + np.float32(1.0 / 24.0)
        p = p * t + np.float32(1.0 / 6.0)
        p = p * t + np.float32(0.5)
        p = p * t + np.float32(1.0)
        values[i] = p * t + np.float32(1.0)
        powers[i] = (np.int32(k) + np.int32(127)) << np.int32(23)  # the bits of the float32 2^k
    scales = powers.view(np.float32)
    for i in range(values.shape[0]):
        values[i] *= scales[i]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _softmax(logits, rows, bias, labels, grad_bias, largest, norms, powers):
    """Columns [0, rows) of the class-major ``logits`` (C, at least ``rows``), without the bias, become
    softmax - onehot(labels), in place; their sum is added to ``grad_bias``. Returns the rows' summed
    cross-entropy. Every loop runs along the rows, so all of it vectorizes, whatever C; ``largest``,
    ``norms`` (float32) and ``powers`` (int32) are scratch of at least ``rows``."""
    n_classes = logits.shape[0]
    largest[:rows] = -np.inf
    for c in range(n_classes):
        for r in range(rows):
            logits[c, r] += bias[c]
            largest[r] = max(largest[r], logits[c, r])
    label_terms = 0.0
    for r in range(rows):
        label_terms += logits[labels[r], r] - largest[r]
    norms[:rows] = 0.0
    for c in range(n_classes):
        for r in range(rows):
            logits[c, r] -= largest[r]
        _exp_nonpositive(logits[c, :rows], powers)
        for r in range(rows):
            norms[r] += logits[c, r]
    # the sum of log(norm) as the log of products of 32 norms: each is in [1, C], so no overflow below 1e9
    # classes, and one log call per 32 rows
    log_norms = 0.0
    for start in range(0, rows, 32):
        product = 1.0
        for r in range(start, min(start + 32, rows)):
            product *= norms[r]
        log_norms += np.log(product)
    for r in range(rows):
        norms[r] = np.float32(1.0) / norms[r]
    for c in range(n_classes):
        for r in range(rows):
            logits[c, r] *= norms[r]
    for r in range(rows):
        logits[labels[r], r] -= np.float32(1.0)
    for c in range(n_classes):
        column_sum = 0.0
        for r in range(rows):
            column_sum += logits[c, r]
        grad_bias[c] += column_sum
    return log_norms - label_terms


# --- the kernels ---------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _row_stride(length):
    """Floats per row for the kernels' own (C, length) buffers: whole 64-byte lines, an odd number of them,
    so that the rows a tile reads together fall in different cache sets (2048 floats a row would put them
    all in one set: 30 % slower gradient pass measured at d = 2048)."""
    lines = (length + 15) // 16
    return (lines + 1 - lines % 2) * 16


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def shifted_weights(weights, bias, width):
    """Weights relative to the last class, transposed, float32, zero beyond the features: (C - 1, stride) for
    features whose rows in the kernel's layout are ``width`` floats long (d, or ``transpose_blocks``' padded d);
    and the bias likewise. Softmax does not see a logit subtracted from all of a row's. Made once per
    evaluation and shared by its row chunks."""
    n_features, n_classes = weights.shape
    reference = n_classes - 1
    shifted = np.zeros((reference, _row_stride(width)), np.float32)
    for c in range(reference):
        for j in range(n_features):
            shifted[c, j] = weights[j, c] - weights[j, reference]
    shifted_bias = np.empty(n_classes, np.float32)
    for c in range(n_classes):
        shifted_bias[c] = bias[c] - bias[reference]
    return shifted, shifted_bias


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _flush(partial, flushed):
    for c in range(flushed.shape[0]):
        for j in range(flushed.shape[1]):
            flushed[c, j] += partial[c, j]
            partial[c, j] = 0.0


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def finish(sums, bias_sums, weights, l2, n_samples, total, grad_weights, grad_bias):
    """The objective and its gradient from the sums of the kernels' row chunks (``softmax_sums``: ``total``
    cross-entropy, ``sums`` (C - 1, at least d) and ``bias_sums`` (C,) over ``n_samples`` rows), plus the L2
    term; writes the gradient into ``grad_weights`` (d, C) and ``grad_bias`` (C,)."""
    n_features, n_classes = weights.shape
    reference = n_classes - 1
    penalty = 0.0
    for j in range(n_features):  # the residuals of each row sum to zero, and so do the class gradients
        sum_of_others = 0.0
        for c in range(reference):
            grad_weights[j, c] = sums[c, j] / n_samples + l2 * weights[j, c]
            sum_of_others += sums[c, j]
        grad_weights[j, reference] = -sum_of_others / n_samples + l2 * weights[j, reference]
        for c in range(n_classes):
            penalty += weights[j, c] * weights[j, c]
    for c in range(n_classes):
        grad_bias[c] = bias_sums[c] / n_samples
    return total / n_samples + 0.5 * l2 * penalty


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def softmax_loss_grad(features, labels, weights, bias, l2, grad_weights, grad_bias):
    """Mean cross-entropy of ``softmax(features @ weights + bias)`` plus ``l2 / 2 * ||weights||^2``; writes
    its gradient in place: ``softmax_sums`` over all the rows, then ``finish``.

    features (N, d) float32 C-contiguous, N >= 1; labels (N,) int64 in [0, C); weights (d, C) and bias (C,),
    any float type (float64 views of the optimizer's parameters: read once, converted here); grad_weights
    (d, C) and grad_bias (C,) float64, overwritten. Returns the objective as a float. Inputs are checked by the
    caller (``softmax.SoftmaxLoss``).
    """
    n_features, n_classes = weights.shape
    shifted, shifted_bias = shifted_weights(weights, bias, n_features)
    sums, bias_sums = np.empty((n_classes - 1, n_features)), np.empty(n_classes)
    total = softmax_sums(features, labels, 0, features.shape[0], shifted, shifted_bias, sums, bias_sums)
    return finish(sums, bias_sums, weights, l2, features.shape[0], total, grad_weights, grad_bias)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def softmax_sums(features, labels, first, stop, shifted, shifted_bias, sums, bias_sums):
    """The sums an evaluation needs over rows [first, stop): returns their summed cross-entropy, and writes the
    float64 sums of residual times features, (C - 1, d), into ``sums`` and of the residuals, (C,), into
    ``bias_sums``.

    features (N, d) float32 C-contiguous, first < stop <= N; labels (N,) int64 in [0, C); ``shifted``,
    ``shifted_bias`` from ``shifted_weights``. Rows in blocks of ``BLOCK_BYTES``, tiles of 4 rows; the rows after
    ``stop`` are prefetched as the next block, so a thread that goes on to the next row chunk finds them in cache.
    """
    n_features = features.shape[1]
    n_classes = shifted_bias.shape[0]
    block = max(4, min(1024, BLOCK_BYTES // (4 * n_features) // 4 * 4))
    logits = np.empty((n_classes, block), np.float32)  # a block's logits, then its residuals, class-major
    largest, norms, powers = np.empty(block, np.float32), np.empty(block, np.float32), np.empty(block, np.int32)
    partial = np.zeros((n_classes - 1, _row_stride(n_features)), np.float32)  # float32 sums since last flush
    sums[:] = 0.0
    bias_sums[:] = 0.0
    total = 0.0
    unflushed = 0
    for start in range(first, stop, block):
        rows = min(block, stop - start)
        last = start + rows - 1
        ahead = start + block  # the next block: half of it fetched during each pass over this one
        logits[:] = 0.0  # the last class's logits stay zero
        for r in range(0, rows, 4):  # a last partial tile repeats the last row; its logits are not used
            _prefetch_rows(features, ahead + r // 2, 2)
            i0 = start + r
            _logits_tiles(features, i0, min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last), shifted, logits, r)
        total += _softmax(logits, rows, shifted_bias, labels[start:], bias_sums, largest, norms, powers)
        logits[:, rows:] = 0.0  # the repeated rows add nothing to the gradient
        for r in range(0, rows, 4):
            _prefetch_rows(features, ahead + block // 2 + r // 2, 2)
            i0 = start + r
            _grad_tiles(features, i0, min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last), logits, r, partial)
        unflushed += rows
        if unflushed >= FLUSH_ROWS or start + rows == stop:
            _flush(partial, sums)
            unflushed = 0
    return total


def transposed_block_rows(n_classes: int) -> int:
    """Rows per block of the transposed layout. Its loops run along the rows, so long blocks: 1024 rows beat
    256 and 512 by 20 to 50 % at d = 64 to 256 with 10 classes, and equalled 2048 and 4096; past about a
    hundred classes the block's logits (C x rows) no longer stay in cache, and 512 rows beat 1024 by 15 %."""
    return 1008 if n_classes <= 128 else 496  # 1024 and 512 less a line: rows in different cache sets


def transpose_blocks(features: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, d) features as (blocks, d rounded up to a multiple of 4, rows a block): each block transposed and
    contiguous, zero where there is no row or no feature. The layout of ``softmax_loss_grad_transposed``."""
    n_samples, n_features = features.shape
    block = min(transposed_block_rows(n_classes), -(-n_samples // 16) * 16)
    n_blocks = -(-n_samples // block)
    padded = np.zeros((n_blocks * block, -(-n_features // 4) * 4), np.float32)
    padded[:n_samples, :n_features] = features
    return np.ascontiguousarray(padded.reshape(n_blocks, block, -1).transpose(0, 2, 1))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def softmax_sums_transposed(blocks, labels, shifted, shifted_bias, sums, bias_sums):
    """``softmax_sums`` on features laid out by ``transpose_blocks``, for few features (up to 128,
    ``softmax.transposed``): there a row's dot products are too short to run at speed, while a block's rows
    are many. The same tiles then run along the rows: logits[c] += sum over 4 features of W[f, c] * X[:, f],
    and the gradient G[c, f] += dot(residual[c], X[:, f]) over the block. ``sums`` is (C - 1, at least the
    blocks' padded width); ``shifted`` from ``shifted_weights`` with that width. Same arguments otherwise.
    """
    n_samples = labels.shape[0]
    n_blocks, width, block = blocks.shape
    n_classes = shifted_bias.shape[0]
    logits = np.empty((n_classes, block), np.float32)
    free = logits[: n_classes - 1]  # the last class's logits stay zero, its gradient comes from the others
    largest, norms, powers = np.empty(block, np.float32), np.empty(block, np.float32), np.empty(block, np.int32)
    partial = np.zeros((n_classes - 1, _row_stride(width)), np.float32)
    sums[:] = 0.0
    bias_sums[:] = 0.0
    total = 0.0
    for b in range(n_blocks):
        start = b * block
        rows = min(block, n_samples - start)
        features_t = blocks[b]
        logits[:] = 0.0
        for f in range(0, width, 4):
            _grad_tiles(features_t, f, f + 1, f + 2, f + 3, shifted, f, free)
        total += _softmax(logits, rows, shifted_bias, labels[start:], bias_sums, largest, norms, powers)
        logits[:, rows:] = 0.0  # padding rows
        for f in range(0, width, 4):
            _logits_tiles(features_t, f, f + 1, f + 2, f + 3, free, partial, f)
        _flush(partial, sums)  # float32 sums over at most a block's rows
    return total


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def softmax_loss_grad_transposed(blocks, labels, weights, bias, l2, grad_weights, grad_bias):
    """``softmax_loss_grad`` on features laid out by ``transpose_blocks``: ``softmax_sums_transposed``, then
    ``finish``."""
    n_classes = weights.shape[1]
    width = blocks.shape[1]
    shifted, shifted_bias = shifted_weights(weights, bias, width)
    sums, bias_sums = np.empty((n_classes - 1, width)), np.empty(n_classes)
    total = softmax_sums_transposed(blocks, labels, shifted, shifted_bias, sums, bias_sums)
    return finish(sums, bias_sums, weights, l2, labels.shape[0], total, grad_weights, grad_bias)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def softmax_loss(features, labels, weights, bias):
    """Mean cross-entropy of ``softmax(features @ weights + bias)`` alone, by ``softmax_loss_grad``'s logits
    pass: the settled test's validation loss, 3 to 5 times faster than numpy's thin product
    (500 x 3200, 10 classes: 0.78 ms for the product alone). Same arguments, no gradient."""
    n_samples, n_features = features.shape
    n_classes = weights.shape[1]
    block = max(4, min(1024, BLOCK_BYTES // (4 * n_features) // 4 * 4))
    shifted, shifted_bias = shifted_weights(weights, bias, n_features)
    logits = np.empty((n_classes, block), np.float32)
    largest, norms, powers = np.empty(block, np.float32), np.empty(block, np.float32), np.empty(block, np.int32)
    unused_grad_bias = np.zeros(n_classes)
    total = 0.0
    for start in range(0, n_samples, block):
        rows = min(block, n_samples - start)
        last = start + rows - 1
        logits[:] = 0.0
        for r in range(0, rows, 4):
            _prefetch_rows(features, start + block + r // 4, 1)
            i0 = start + r
            _logits_tiles(features, i0, min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last), shifted, logits, r)
        total += _softmax(logits, rows, shifted_bias, labels[start:], unused_grad_bias, largest, norms, powers)
    return total / n_samples
