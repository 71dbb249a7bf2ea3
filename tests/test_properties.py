"""Property-based tests (hypothesis): the reductions and the data loaders over random shapes and dtypes,
against the slow obvious references in reference.py."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import probecore
import reference as ref
from probecore.datasets import load_dataset, pack_inputs, split_dataset
from probecore.errors import DataError
from probecore.reduction import ReductionPolicy, plan_reduction

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.uint8]


def batch_of(draw, shape, dtype):
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).normal(scale=20, size=shape)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.round(values), info.min, info.max)
    return values.astype(dtype)


@st.composite
def feature_maps(draw):
    channels, height, width = draw(st.integers(1, 6)), draw(st.integers(1, 11)), draw(st.integers(1, 11))
    n = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    max_features = draw(st.integers(1, channels * height * width + 5))
    return batch_of(draw, (n, channels, height, width), dtype), max_features, draw(st.sampled_from(["avg", "max"]))


@SETTINGS
@given(feature_maps(), st.booleans())
def test_feature_map_reduction_matches_the_reference_in_either_layout(case, channels_last):
    maps, max_features, pool = case
    n, channels, height, width = maps.shape
    policy = ReductionPolicy(max_features=max_features, pool=pool, channels_last=channels_last, seed=3)
    batch = maps.transpose(0, 2, 3, 1) if channels_last else maps
    reduction = plan_reduction("layer", batch.shape[1:], policy)
    features = reduction.apply(batch)
    assert features.shape == (n, reduction.n_features_out) and features.dtype == np.float32
    assert reduction.n_features_out <= max_features or reduction.pool is None and reduction.subset is None
    if reduction.pool is None:
        expected = maps.astype(np.float64).reshape(n, -1) if not channels_last else batch.astype(np.float64).reshape(n, -1)
    else:
        expected = ref.pool2d(maps, reduction.window, pool).reshape(n, -1)
    if reduction.subset is not None:
        expected = expected[:, reduction.subset]
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-4)


@st.composite
def token_batches(draw):
    n, tokens, width = draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 7))
    batch = batch_of(draw, (n, tokens, width), draw(st.sampled_from([np.float16, np.float32, np.float64])))
    lengths = np.array(draw(st.lists(st.integers(0, tokens), min_size=n, max_size=n)))
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(draw(st.sampled_from([np.int64, np.int32, bool])))
    return batch, mask, lengths


@SETTINGS
@given(token_batches(), st.sampled_from(["mean", "max", "first", "last"]))
def test_token_pooling_reads_each_row_real_tokens_only(case, tokens):
    batch, mask, lengths = case
    reduction = plan_reduction("seq", batch.shape[1:], ReductionPolicy(tokens=tokens), mask_input="mask")
    features = reduction.apply(batch, mask)
    for row, length in enumerate(lengths):
        real = batch[row, :length].astype(np.float64)
        if tokens == "first":
            expected = batch[row, 0].astype(np.float64)
        elif length == 0:
            expected = np.zeros(batch.shape[2])
        else:
            expected = {"mean": real.mean(0), "max": real.max(0), "last": real[-1]}[tokens]
        np.testing.assert_allclose(features[row], expected, rtol=1e-5, atol=1e-4)


@st.composite
def labelled_pools(draw):
    n_classes = draw(st.integers(2, 5))
    sizes = draw(st.lists(st.integers(3, 30), min_size=n_classes, max_size=n_classes))
    labels = np.repeat(np.arange(n_classes), sizes)
    labels = labels[np.random.default_rng(draw(st.integers(0, 1000))).permutation(len(labels))]
    dtype = draw(st.sampled_from(DTYPES))
    shape = (len(labels), *draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    x = batch_of(draw, shape, dtype)
    x.reshape(len(labels), -1)[:, 0] = np.arange(len(labels)) % 200  # a row id (fits every dtype)
    if draw(st.booleans()):
        labels = np.array([f"class-{code}" for code in labels])
    return x, labels


@SETTINGS
@given(labelled_pools(), st.floats(0.05, 0.4), st.floats(0.05, 0.4), st.integers(0, 50))
def test_splits_cover_every_row_once_keep_labels_and_dtypes_and_repeat_for_a_seed(pool, valid, test, seed):
    x, labels = pool
    try:
        dataset = split_dataset(x, labels, valid, test, seed)
    except DataError as exc:  # too few samples per class for a fraction: refused, saying how many are needed
        assert "too few samples per class for three splits" in str(exc) and "give ready splits" in str(exc)
        return
    again = split_dataset(x, labels, valid, test, seed)
    joined = np.concatenate([split.x for split in dataset.splits().values()])
    assert len(joined) == len(x) and joined.dtype == x.dtype and joined.shape[1:] == x.shape[1:]
    rows = np.concatenate([split.x.reshape(len(split.x), -1)[:, 0] for split in dataset.splits().values()])
    assert sorted(rows.astype(np.int64).tolist()) == sorted((np.arange(len(x)) % 200).tolist())
    assert set(dataset.classes[dataset.train.y].tolist()) == set(labels.tolist())  # every class is trained on
    for (name, split), other in zip(dataset.splits().items(), again.splits().values()):
        np.testing.assert_array_equal(split.x, other.x)
        np.testing.assert_array_equal(split.y, other.y)


@SETTINGS
@given(labelled_pools())
def test_an_npz_file_loads_back_exactly(tmp_path_factory, pool):
    x, labels = pool
    path = tmp_path_factory.mktemp("npz") / "data.npz"
    cut = len(x) // 2
    np.savez(path, x_train=x[:cut], y_train=labels[:cut], x_test=x[cut:], y_test=labels[cut:])
    if len(set(labels[:cut].tolist())) < 2:
        with pytest.raises(DataError):
            load_dataset(path)
        return
    try:
        dataset = load_dataset(path, valid_fraction=0.2)
    except DataError as exc:  # a class too small to give the validation split a sample is refused, by name
        assert "valid" in str(exc) or "class" in str(exc)
        return
    assert np.array_equal(dataset.test.x, x[cut:]) and dataset.test.x.dtype == x.dtype
    np.testing.assert_array_equal(dataset.classes[dataset.test.y], labels[cut:])
    train_and_valid = np.concatenate([dataset.train.x, dataset.valid.x])
    assert len(train_and_valid) == cut and train_and_valid.dtype == x.dtype


@SETTINGS
@given(st.integers(1, 20), st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(1, 4), max_size=2)),
                                    min_size=1, max_size=3))  # fmt: skip
def test_packed_inputs_keep_each_field_dtype_shape_and_rows(n, fields):
    rng = np.random.default_rng(n)
    arrays = {f"in{i}": (rng.normal(size=(n, *shape)) * 10).astype(dtype) for i, (dtype, shape) in enumerate(fields)}
    packed = pack_inputs(**arrays)
    assert packed.shape == (n,)
    for name, array in arrays.items():
        assert packed[name].dtype == array.dtype and packed[name].shape == array.shape
        np.testing.assert_array_equal(packed[name], array)
    rows = np.array([n - 1, 0])
    np.testing.assert_array_equal(packed[rows]["in0"], arrays["in0"][rows])
    assert probecore.pack_inputs is pack_inputs and math.prod(packed.shape) == n
