"""The numba kernels against the float64 references in ``reference.py``, on fresh random inputs."""

import math

import numpy as np
import pytest

import reference as ref
from probecore import kernels

# Kernels take float32 and float64; Reduction.apply casts anything else (float16 included) to float32 first.
DTYPES = [np.float32, np.float64]
WIDE = [np.float32, np.float64]
# Kernels accumulate in float64 and write float32, so only the final float32 rounding separates them from the
# float64 reference.
TOL = dict(rtol=2e-6, atol=2e-6)
# (N, C, H, W, window): windows that divide H and W, that leave edge tiles, and that cover the whole map.
POOL_CASES = [
    (2, 3, 8, 8, 2),
    (3, 2, 9, 6, 3),
    (2, 4, 7, 5, 2),
    (1, 3, 10, 7, 4),
    (2, 2, 5, 11, 3),
    (4, 1, 6, 6, 6),
    (2, 3, 5, 7, 7),
    (2, 3, 5, 7, 20),
    (1, 2, 1, 9, 2),
]


def _pool2d(maps, window, kind):
    n_samples, n_channels, height, width = maps.shape
    out = np.empty((n_samples, n_channels, math.ceil(height / window), math.ceil(width / window)), np.float32)
    kernels.pool2d(maps, window, kind == "max", out)
    return out


def _pool2d_channels_last(maps_nhwc, window, kind):
    n_samples, height, width, n_channels = maps_nhwc.shape
    out = np.empty((n_samples, n_channels, math.ceil(height / window), math.ceil(width / window)), np.float32)
    kernels.pool2d_channels_last(maps_nhwc, window, kind == "max", out)
    return out


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("n, c, h, w, window", POOL_CASES)
def test_pool2d_matches_reference(n, c, h, w, window, kind):
    rng = np.random.default_rng([1, n, c, h, w, window])
    maps = rng.standard_normal((n, c, h, w)).astype(np.float32)
    np.testing.assert_allclose(_pool2d(maps, window, kind), ref.pool2d(maps, window, kind), **TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool2d_accepts_float32_and_float64(dtype, kind):
    rng = np.random.default_rng(2)
    maps = (rng.standard_normal((3, 4, 7, 9)) * 10).astype(dtype)
    np.testing.assert_allclose(_pool2d(maps, 3, kind), ref.pool2d(maps, 3, kind), **TOL)


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("h, w", [(6, 6), (5, 9), (1, 1)])
def test_pool2d_window_covering_the_map_is_global_pooling(h, w, kind):
    rng = np.random.default_rng([3, h, w])
    maps = rng.standard_normal((3, 5, h, w))
    expected = maps.max(axis=(2, 3)) if kind == "max" else maps.mean(axis=(2, 3))
    for window in (max(h, w), max(h, w) + 3):
        out = _pool2d(maps, window, kind)
        assert out.shape == (3, 5, 1, 1)
        np.testing.assert_allclose(out[:, :, 0, 0], expected, **TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool2d_reads_non_contiguous_views(dtype, kind):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((2, 7, 9, 3)).astype(dtype)
    transposed = base.transpose(0, 3, 1, 2)  # (N, C, H, W) view over NHWC memory
    strided = rng.standard_normal((4, 6, 10, 14)).astype(dtype)[::2, ::2, :, ::2]  # every other sample/channel/col
    for maps in (transposed, strided):
        assert not maps.flags.c_contiguous
        np.testing.assert_allclose(_pool2d(maps, 3, kind), ref.pool2d(maps, 3, kind), **TOL)


def test_pool2d_max_propagates_nan_only_into_its_tile():
    rng = np.random.default_rng(5)
    maps = rng.standard_normal((1, 2, 6, 6))
    maps[0, 1, 4, 1] = np.nan
    out = _pool2d(maps, 3, "max")
    assert np.isnan(out[0, 1, 1, 0])
    assert np.isnan(out).sum() == 1
    np.testing.assert_allclose(out, ref.pool2d(maps, 3, "max"), **TOL)


@pytest.mark.parametrize("dtype", WIDE, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("n, c, h, w, window", POOL_CASES[::2])
def test_pool2d_channels_last_equals_pool2d_on_the_transposed_array(n, c, h, w, window, kind, dtype):
    rng = np.random.default_rng([6, n, c, h, w, window])
    maps_nhwc = rng.standard_normal((n, h, w, c)).astype(dtype)
    channels_last = _pool2d_channels_last(maps_nhwc, window, kind)
    maps_nchw = maps_nhwc.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(channels_last, _pool2d(maps_nchw, window, kind), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(channels_last, ref.pool2d(maps_nchw, window, kind), **TOL)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool2d_channels_last_reads_non_contiguous_views(kind):
    rng = np.random.default_rng(7)
    maps_nhwc = rng.standard_normal((2, 4, 9, 8)).astype(np.float32).transpose(0, 2, 3, 1)  # (N, H, W, C) view
    assert not maps_nhwc.flags.c_contiguous
    expected = ref.pool2d(maps_nhwc.transpose(0, 3, 1, 2), 4, kind)
    np.testing.assert_allclose(_pool2d_channels_last(maps_nhwc, 4, kind), expected, **TOL)


@pytest.mark.parametrize("dtype", WIDE, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("n, t, d", [(1, 1, 4), (3, 5, 2), (4, 17, 9), (2, 64, 33)])
def test_pool_sequence_matches_reference(n, t, d, kind, dtype):
    rng = np.random.default_rng([8, n, t, d])
    seq = rng.standard_normal((n, t, d)).astype(dtype)
    out = np.empty((n, d), np.float32)
    kernels.pool_sequence(seq, kind == "max", out)
    np.testing.assert_allclose(out, ref.pool_sequence(seq, kind), **TOL)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool_sequence_reads_non_contiguous_views(kind):
    rng = np.random.default_rng(9)
    seq = rng.standard_normal((6, 11, 5)).transpose(1, 0, 2)  # (11, 6, 5) view
    assert not seq.flags.c_contiguous
    out = np.empty((11, 5), np.float32)
    kernels.pool_sequence(seq, kind == "max", out)
    np.testing.assert_allclose(out, ref.pool_sequence(seq, kind), **TOL)


@pytest.mark.parametrize("dtype", WIDE, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n, f, k", [(1, 1, 1), (5, 20, 7), (13, 300, 300), (8, 50, 120)])
def test_gather_columns_equals_fancy_indexing(n, f, k, dtype):
    rng = np.random.default_rng([10, n, f, k])
    rows = rng.standard_normal((n, f)).astype(dtype)
    columns = rng.integers(0, f, size=k).astype(np.int64)  # unsorted, with repeats when k is large
    out = np.empty((n, k), np.float32)
    kernels.gather_columns(rows, columns, out)
    np.testing.assert_array_equal(out, rows.astype(np.float64)[:, columns].astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool2d_channels_last_accepts_float32_and_float64(dtype, kind):
    rng = np.random.default_rng(11)
    maps_nhwc = (rng.standard_normal((3, 7, 9, 4)) * 10).astype(dtype)
    expected = ref.pool2d(maps_nhwc.transpose(0, 3, 1, 2), 3, kind)
    np.testing.assert_allclose(_pool2d_channels_last(maps_nhwc, 3, kind), expected, **TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool_sequence_accepts_float32_and_float64(dtype, kind):
    rng = np.random.default_rng(12)
    seq = (rng.standard_normal((3, 13, 6)) * 10).astype(dtype)
    out = np.empty((3, 6), np.float32)
    kernels.pool_sequence(seq, kind == "max", out)
    np.testing.assert_allclose(out, ref.pool_sequence(seq, kind), **TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_gather_columns_accepts_float32_and_float64(dtype):
    rng = np.random.default_rng(13)
    rows = (rng.standard_normal((4, 30)) * 10).astype(dtype)
    columns = np.sort(rng.choice(30, size=12, replace=False)).astype(np.int64)
    out = np.empty((4, 12), np.float32)
    kernels.gather_columns(rows, columns, out)
    np.testing.assert_array_equal(out, rows[:, columns].astype(np.float32))
