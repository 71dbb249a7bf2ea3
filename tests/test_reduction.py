"""Planning and applying per-layer reductions: ReductionPolicy, plan_reduction, Reduction.apply."""

import math

import numpy as np
import pytest

import reference as ref
from probecore.errors import ReductionError
from probecore.reduction import MAX_UNREDUCED_FEATURES, ReductionPolicy, plan_reduction

TOL = dict(rtol=2e-6, atol=2e-6)


def _check_output(features, n_samples, reduction):
    assert features.dtype == np.float32
    assert features.flags.c_contiguous
    assert features.shape == (n_samples, reduction.n_features_out)


# --- no reduction ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_shape", [(7,), (3, 4), (2, 3, 4), (2, 2, 2, 2), (64,)])
def test_layers_within_max_features_are_kept_whole(sample_shape):
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((5, *sample_shape))
    reduction = plan_reduction("layer", sample_shape, ReductionPolicy(max_features=math.prod(sample_shape)))
    assert reduction.pool is None and reduction.subset is None
    features = reduction.apply(batch)
    _check_output(features, 5, reduction)
    np.testing.assert_array_equal(features, batch.reshape(5, -1).astype(np.float32))


# --- spatial pooling -------------------------------------------------------------------------------------

# (C, H, W, max_features): limits that need windows of various sizes, on square and non-square maps.
SPATIAL_CASES = [
    (3, 8, 8, 48),
    (3, 8, 8, 47),
    (4, 9, 7, 30),
    (2, 13, 5, 20),
    (1, 28, 28, 100),
    (8, 6, 6, 8),
    (5, 3, 17, 12),
    (16, 14, 14, 200),
]


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("c, h, w, max_features", SPATIAL_CASES)
def test_spatial_layers_are_pooled_with_the_smallest_window_that_fits(c, h, w, max_features, pool):
    rng = np.random.default_rng([2, c, h, w, max_features])
    reduction = plan_reduction("conv", (c, h, w), ReductionPolicy(max_features=max_features, pool=pool))
    expected_window = ref.smallest_fitting_window(c, h, w, max_features)
    assert expected_window is not None and expected_window > 1  # the cases above all fit after pooling
    assert reduction.pool == pool and reduction.window == expected_window and reduction.subset is None
    assert reduction.n_features_out == c * math.ceil(h / expected_window) * math.ceil(w / expected_window)
    assert reduction.n_features_out <= max_features

    batch = rng.standard_normal((4, c, h, w)).astype(np.float32)
    features = reduction.apply(batch)
    _check_output(features, 4, reduction)
    np.testing.assert_allclose(features, ref.pool2d(batch, expected_window, pool).reshape(4, -1), **TOL)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("c, h, w", [(3, 8, 8), (4, 5, 9), (2, 1, 6)])
def test_global_pool_keeps_one_value_per_channel(c, h, w, pool):
    rng = np.random.default_rng([3, c, h, w])
    # max_features leaves room for a small window; global_pool must pool to 1 x 1 anyway.
    policy = ReductionPolicy(max_features=c * h * w - 1, pool=pool, global_pool=True)
    reduction = plan_reduction("conv", (c, h, w), policy)
    assert reduction.n_features_out == c and reduction.subset is None
    batch = rng.standard_normal((6, c, h, w))
    expected = batch.max(axis=(2, 3)) if pool == "max" else batch.mean(axis=(2, 3))
    features = reduction.apply(batch)
    _check_output(features, 6, reduction)
    np.testing.assert_allclose(features, expected, **TOL)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize(
    "c, h, w, max_features, global_pool",
    [(3, 8, 8, 47, False), (4, 9, 7, 30, False), (5, 6, 6, 5, True), (20, 6, 5, 12, False)],
)
def test_channels_last_gives_the_features_of_channels_first_on_the_transposed_tensor(
    c, h, w, max_features, global_pool, pool
):
    rng = np.random.default_rng([4, c, h, w, max_features])
    nchw = rng.standard_normal((5, c, h, w)).astype(np.float32)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    common = dict(max_features=max_features, pool=pool, global_pool=global_pool)
    first = plan_reduction("conv", (c, h, w), ReductionPolicy(**common))
    last = plan_reduction("conv", (h, w, c), ReductionPolicy(channels_last=True, **common))
    assert last.window == first.window
    features = last.apply(nhwc)
    _check_output(features, 5, last)
    np.testing.assert_allclose(features, first.apply(nchw), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("t, d, max_features", [(10, 6, 30), (3, 20, 20), (50, 8, 100)])
def test_sequence_layers_are_pooled_over_time(t, d, max_features, pool):
    rng = np.random.default_rng([5, t, d])
    reduction = plan_reduction("tokens", (t, d), ReductionPolicy(max_features=max_features, pool=pool))
    assert reduction.layout == "sequence" and reduction.pool == pool and reduction.subset is None
    batch = rng.standard_normal((7, t, d)).astype(np.float32)
    features = reduction.apply(batch)
    _check_output(features, 7, reduction)
    np.testing.assert_allclose(features, ref.pool_sequence(batch, pool), **TOL)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_sequence_wider_than_max_features_is_pooled_then_subset(pool):
    rng = np.random.default_rng(6)
    reduction = plan_reduction("tokens", (9, 40), ReductionPolicy(max_features=15, pool=pool))
    assert reduction.pool == pool and len(reduction.subset) == 15
    batch = rng.standard_normal((4, 9, 40))
    features = reduction.apply(batch)
    _check_output(features, 4, reduction)
    np.testing.assert_allclose(features, ref.pool_sequence(batch, pool)[:, reduction.subset], **TOL)


@pytest.mark.parametrize("tokens", ["mean", "max", "first", "last"])
def test_token_pooling_skips_padding_row_by_row(tokens, rng):
    n, t, d = 6, 7, 5
    lengths = np.array([7, 1, 3, 0, 5, 2])  # the fourth sequence has no real token at all
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    batch = rng.standard_normal((n, t, d)).astype(np.float32)
    reduction = plan_reduction("encoder", (t, d), ReductionPolicy(tokens=tokens), mask_input="attention_mask")
    assert reduction.tokens == tokens and reduction.subset is None and reduction.n_features_out == d
    features = reduction.apply(batch, mask)
    _check_output(features, n, reduction)
    for row, length in enumerate(lengths):  # each row alone, its real tokens only, in float64
        real = batch[row, :length].astype(np.float64)
        if tokens == "first":
            expected = batch[row, 0]
        elif length == 0:
            expected = np.zeros(d)
        else:
            expected = {"mean": real.mean(0), "max": real.max(0), "last": real[-1]}[tokens]
        np.testing.assert_allclose(features[row], expected, **TOL, err_msg=f"row {row}")
    unmasked = reduction.apply(batch)  # no mask: every token is real
    whole = {"mean": batch.mean(1), "max": batch.max(1), "first": batch[:, 0], "last": batch[:, -1]}[tokens]
    np.testing.assert_allclose(unmasked, whole, **TOL)


def test_token_pooling_applies_at_any_size_then_subsets_wide_vectors():
    policy = ReductionPolicy(max_features=16, tokens="mean", seed=2)
    narrow = plan_reduction("small", (3, 4), policy)  # 12 features: under the limit, pooled all the same
    assert narrow.n_features_out == 4 and narrow.describe() == "mean of tokens"
    wide = plan_reduction("wide", (5, 40), policy, mask_input="attention_mask")
    assert len(wide.subset) == 16 and wide.describe() == "mean of real tokens -> random 16 of 40"
    assert plan_reduction("conv", (4, 6, 6), policy).tokens is None  # feature maps are not sequences
    with pytest.raises(ReductionError, match="tokens must be one of mean, max, first, last"):
        ReductionPolicy(tokens="cls")


def test_a_layout_known_to_the_source_wins_over_the_policy_guess():
    policy = ReductionPolicy(max_features=8)
    assert plan_reduction("keras", (6, 6, 4), policy, layout="channels_last").layout == "channels_last"
    assert plan_reduction("torch", (4, 6, 6), policy).layout == "channels_first"
    assert plan_reduction("odd", (6, 4), policy, layout="channels_last").layout == "sequence"  # rank decides


# --- random subsets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_shape, max_features", [((100,), 10), ((1000,), 999), ((5, 4, 3, 2), 17), ((300,), 1)])
def test_flat_layers_keep_a_sorted_unique_subset_of_exactly_max_features(sample_shape, max_features):
    rng = np.random.default_rng(7)
    reduction = plan_reduction("fc", sample_shape, ReductionPolicy(max_features=max_features, seed=3))
    subset = reduction.subset
    assert reduction.pool is None and len(subset) == max_features
    assert np.all(np.diff(subset) > 0)  # sorted and unique
    assert subset[0] >= 0 and subset[-1] < math.prod(sample_shape)
    batch = rng.standard_normal((6, *sample_shape))
    features = reduction.apply(batch)
    _check_output(features, 6, reduction)
    np.testing.assert_array_equal(features, batch.reshape(6, -1)[:, subset].astype(np.float32))


def test_subset_depends_only_on_seed_and_layer_name():
    def subset(layer, seed):
        return plan_reduction(layer, (500,), ReductionPolicy(max_features=50, seed=seed)).subset

    np.testing.assert_array_equal(subset("fc1", 0), subset("fc1", 0))
    np.testing.assert_array_equal(subset("fc1", 12345), subset("fc1", 12345))
    assert not np.array_equal(subset("fc1", 0), subset("fc1", 1))
    assert not np.array_equal(subset("fc1", 0), subset("fc2", 0))


@pytest.mark.parametrize(
    "sample_shape, policy",
    [
        ((400,), ReductionPolicy(max_features=30)),
        ((64, 6, 6), ReductionPolicy(max_features=40, pool="max")),
        ((6, 6, 64), ReductionPolicy(max_features=40, channels_last=True)),
        ((12, 50), ReductionPolicy(max_features=20)),
    ],
    ids=["flat", "channels-first", "channels-last", "sequence"],
)
def test_the_same_subset_is_applied_to_every_batch(sample_shape, policy):
    rng = np.random.default_rng(8)
    reduction = plan_reduction("layer", sample_shape, policy)
    assert reduction.subset is not None
    batch = rng.standard_normal((10, *sample_shape)).astype(np.float32)
    whole = reduction.apply(batch)
    halves = np.concatenate([reduction.apply(batch[:3]), reduction.apply(batch[3:])])
    np.testing.assert_array_equal(halves, whole)
    again = plan_reduction("layer", sample_shape, policy)  # e.g. the same layer planned for another split
    np.testing.assert_array_equal(again.apply(batch), whole)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("c, h, w, max_features", [(64, 6, 6, 40), (100, 5, 3, 99), (10, 1, 1, 4)])
def test_channels_beyond_max_features_are_pooled_globally_then_subset(c, h, w, max_features, pool):
    rng = np.random.default_rng([9, c, h, w])
    reduction = plan_reduction("conv", (c, h, w), ReductionPolicy(max_features=max_features, pool=pool))
    assert ref.smallest_fitting_window(c, h, w, max_features) is None
    assert reduction.pooled_shape == (c, 1, 1)
    assert len(reduction.subset) == max_features and np.all(np.diff(reduction.subset) > 0)
    batch = rng.standard_normal((5, c, h, w))
    expected = ref.pool2d(batch, max(h, w), pool).reshape(5, c)[:, reduction.subset]
    features = reduction.apply(batch)
    _check_output(features, 5, reduction)
    np.testing.assert_allclose(features, expected, **TOL)


# --- reduction disabled ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_shape", [(5000,), (16, 20, 20), (30, 40)])
def test_disabled_reduction_keeps_every_feature(sample_shape):
    rng = np.random.default_rng(10)
    reduction = plan_reduction("layer", sample_shape, ReductionPolicy(max_features=10, enabled=False))
    assert reduction.pool is None and reduction.subset is None
    batch = rng.standard_normal((3, *sample_shape))
    features = reduction.apply(batch)
    _check_output(features, 3, reduction)
    np.testing.assert_array_equal(features, batch.reshape(3, -1).astype(np.float32))


@pytest.mark.parametrize("sample_shape", [(MAX_UNREDUCED_FEATURES + 1,), (65, 64, 64), (2, 512, 257)])
def test_disabled_reduction_refuses_layers_above_the_unreduced_limit(sample_shape):
    assert math.prod(sample_shape) > MAX_UNREDUCED_FEATURES
    with pytest.raises(ReductionError, match="features"):
        plan_reduction("huge", sample_shape, ReductionPolicy(enabled=False))
    # At exactly the limit it is still allowed.
    assert plan_reduction("ok", (MAX_UNREDUCED_FEATURES,), ReductionPolicy(enabled=False)).subset is None


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [dict(max_features=0), dict(max_features=-3), dict(pool="mean"), dict(pool="MAX"), dict(pool=None)]
)
def test_bad_policy_values_raise_reduction_error(bad):
    with pytest.raises(ReductionError):
        ReductionPolicy(**bad)


def test_negative_seed_is_either_used_reproducibly_or_refused_with_reduction_error():
    # The CLI passes --seed straight through; a bad value must not surface as a bare numpy ValueError.
    try:
        first = plan_reduction("fc", (100,), ReductionPolicy(max_features=10, seed=-1))
    except ReductionError:
        return
    again = plan_reduction("fc", (100,), ReductionPolicy(max_features=10, seed=-1))
    assert len(first.subset) == 10
    np.testing.assert_array_equal(first.subset, again.subset)


@pytest.mark.parametrize(
    "sample_shape, batch_shape",
    [((10,), (4, 11)), ((3, 4, 4), (4, 3, 4, 5)), ((3, 4, 4), (4, 48)), ((6, 8), (4, 8, 6)), ((5,), (5,))],
)
def test_apply_on_a_batch_of_the_wrong_shape_raises_reduction_error(sample_shape, batch_shape):
    for policy in (ReductionPolicy(max_features=4), ReductionPolicy(max_features=1000)):
        reduction = plan_reduction("layer", sample_shape, policy)
        with pytest.raises(ReductionError, match="shape"):
            reduction.apply(np.zeros(batch_shape, np.float32))


# --- output dtype and layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "sample_shape, policy",
    [
        ((4, 6, 6), ReductionPolicy(max_features=1000)),  # kept whole
        ((4, 6, 6), ReductionPolicy(max_features=40)),  # pooled
        ((6, 6, 4), ReductionPolicy(max_features=40, channels_last=True)),  # pooled, channels last
        ((7, 9), ReductionPolicy(max_features=5)),  # pooled over time, then subset
        ((300,), ReductionPolicy(max_features=25)),  # subset
    ],
    ids=["whole", "pooled", "pooled-channels-last", "sequence-subset", "flat-subset"],
)
def test_apply_returns_float32_c_contiguous_for_any_float_input(sample_shape, policy, dtype):
    rng = np.random.default_rng(11)
    reduction = plan_reduction("layer", sample_shape, policy)
    batch = (rng.standard_normal((5, *sample_shape)) * 4).astype(dtype)
    features = reduction.apply(batch)
    _check_output(features, 5, reduction)
    # The same values given as float64 reduce to the same features.
    np.testing.assert_allclose(features, reduction.apply(batch.astype(np.float64)), **TOL)


def test_apply_accepts_a_non_contiguous_batch():
    rng = np.random.default_rng(12)
    for max_features in (1000, 30, 2):  # kept whole, pooled, pooled globally then subset
        policy = ReductionPolicy(max_features=max_features)
        reduction = plan_reduction("conv", (3, 5, 4), policy)
        batch = rng.standard_normal((6, 4, 5, 3)).astype(np.float32).transpose(0, 3, 2, 1)  # (6, 3, 5, 4) view
        assert not batch.flags.c_contiguous
        features = reduction.apply(batch)
        _check_output(features, 6, reduction)
        np.testing.assert_array_equal(features, reduction.apply(np.ascontiguousarray(batch)))
