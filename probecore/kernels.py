"""numba kernels for passes over features: the per-batch reductions, and the fit's standardization.

Short explicit loops, compiled once (``cache=True``). Serial on purpose: these passes are memory-bound, and
numba's parallel launch cost about 8 ms a call on a 2-core machine (benchmarks/README.md). Input checking
lives in ``reduction.py``; these assume well-formed arrays. ``tests/reference.py`` holds the slow obvious
versions they are tested against.
"""

import numba
import numpy as np


@numba.njit(cache=True)
def pool2d(maps, window, use_max, out):
    """Pool (N, C, H, W) maps (any strides) in non-overlapping window x window tiles into ``out``.

    ``out`` is (N, C, ceil(H / window), ceil(W / window)); edge tiles cover what is left of the map
    (ONNX ``ceil_mode=1``, padding not counted), so ``window >= max(H, W)`` is global pooling.
    """
    n_samples, n_channels, height, width = maps.shape
    out_h, out_w = out.shape[2], out.shape[3]
    for sample_channel in range(n_samples * n_channels):
        n = sample_channel // n_channels
        c = sample_channel % n_channels
        for i in range(out_h):
            h0 = i * window
            h1 = min(h0 + window, height)
            for j in range(out_w):
                w0 = j * window
                w1 = min(w0 + window, width)
                if use_max:
                    best = -np.inf
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            value = np.float64(maps[n, c, h, w])
                            if value > best or value != value:  # NaN propagates, as in ONNX MaxPool
                                best = value
                    out[n, c, i, j] = best
                else:
                    total = 0.0
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            total += maps[n, c, h, w]
                    out[n, c, i, j] = total / ((h1 - h0) * (w1 - w0))


@numba.njit(cache=True)
def pool2d_channels_last(maps, window, use_max, out):
    """``pool2d`` for (N, H, W, C) maps, reading channels contiguously; ``out`` is (N, C, out_h, out_w)."""
    n_samples, height, width, n_channels = maps.shape
    out_h, out_w = out.shape[2], out.shape[3]
    for sample_tile in range(n_samples * out_h):
        n = sample_tile // out_h
        i = sample_tile % out_h
        h0 = i * window
        h1 = min(h0 + window, height)
        acc = np.empty(n_channels, dtype=np.float64)
        for j in range(out_w):
            w0 = j * window
            w1 = min(w0 + window, width)
            acc[:] = -np.inf if use_max else 0.0
            for h in range(h0, h1):
                for w in range(w0, w1):
                    for c in range(n_channels):
                        value = np.float64(maps[n, h, w, c])
                        if use_max:
                            if value > acc[c] or value != value:
                                acc[c] = value
                        else:
                            acc[c] += value
            scale = 1.0 if use_max else 1.0 / ((h1 - h0) * (w1 - w0))
            for c in range(n_channels):
                out[n, c, i, j] = acc[c] * scale


@numba.njit(cache=True)
def pool_sequence(seq, use_max, out):
    """Mean or max of (N, T, D) sequences over T into ``out`` (N, D)."""
    n_samples, length, width = seq.shape
    for n in range(n_samples):
        acc = np.full(width, -np.inf if use_max else 0.0)
        for t in range(length):
            for d in range(width):
                value = np.float64(seq[n, t, d])
                if use_max:
                    if value > acc[d] or value != value:
                        acc[d] = value
                else:
                    acc[d] += value
        scale = 1.0 if use_max else 1.0 / length
        for d in range(width):
            out[n, d] = acc[d] * scale


@numba.njit(cache=True)
def gather_columns(rows, columns, out):
    """Copy ``rows[:, columns]`` of an (N, F) array into ``out`` (N, K): the fixed random subset."""
    for n in range(rows.shape[0]):
        for k in range(columns.shape[0]):
            out[n, k] = rows[n, columns[k]]


@numba.njit(cache=True)
def permute_rows(rows, order):
    """Reorder the rows of a (N, row bytes) uint8 array in place so that row i becomes old row ``order[i]``
    (a permutation of 0..N-1), one row of scratch: each cycle of the permutation is followed once."""
    n_rows = rows.shape[0]
    placed = np.zeros(n_rows, np.bool_)
    scratch = np.empty(rows.shape[1], np.uint8)
    for start in range(n_rows):
        if placed[start]:
            continue
        scratch[:] = rows[start]
        i = start
        while True:
            placed[i] = True
            j = order[i]
            if j == start:
                rows[i] = scratch
                break
            rows[i] = rows[j]
            i = j


@numba.njit(cache=True, nogil=True)
def add_moments(rows, shift, sums, squares):
    """``sums += sum(rows - shift)`` and ``squares += sum((rows - shift) ** 2)`` per column, in float64: one pass
    for the mean and spread (a shift near the mean keeps the variance from cancelling)."""
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            value = np.float64(rows[i, j]) - shift[j]
            sums[j] += value
            squares[j] += value * value


@numba.njit(cache=True, nogil=True)
def standardize(rows, mean, scale, out):
    """``out = (rows - mean) / scale`` in one pass (numpy's subtract then divide made two), in the rows' precision
    (float32 or float64), written as float32."""
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            out[i, j] = (rows[i, j] - mean[j]) / scale[j]
