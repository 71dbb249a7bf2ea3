"""split_dataset and load_dataset: stratified reproducible splits, label encoding, and every refusal."""

import pickle

import numpy as np
import pytest

from probecore.datasets import _class_size_needed, _split_sizes, dataset_from_splits, load_dataset, split_dataset
from probecore.errors import DataError


def _labelled_pool(rng, class_sizes, n_features=3):
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    labels = labels[rng.permutation(len(labels))]
    x = np.arange(len(labels) * n_features, dtype=np.float32).reshape(len(labels), n_features)  # row i holds i
    return x, labels


def _rows(split, n_features=3):
    """Original row numbers of a split made from ``_labelled_pool`` (its x rows encode them)."""
    return (split.x[:, 0] // n_features).astype(np.int64)


# --- split_dataset ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "class_sizes, valid_fraction, test_fraction",
    [([50, 50], 0.1, 0.2), ([100, 30, 7], 0.15, 0.25), ([13, 27, 41, 9, 60], 0.2, 0.3), ([500, 5], 0.05, 0.1)],
)
def test_split_is_stratified_disjoint_and_covers_every_row(class_sizes, valid_fraction, test_fraction):
    rng = np.random.default_rng([1, *class_sizes])
    x, labels = _labelled_pool(rng, class_sizes)
    dataset = split_dataset(x, labels, valid_fraction, test_fraction, seed=4)
    rows = {name: _rows(split) for name, split in dataset.splits().items()}
    all_rows = np.concatenate(list(rows.values()))
    assert len(all_rows) == len(labels) and len(np.unique(all_rows)) == len(labels)  # disjoint, covering

    fractions = {"valid": valid_fraction, "test": test_fraction, "train": 1 - valid_fraction - test_fraction}
    for name, split in dataset.splits().items():
        np.testing.assert_array_equal(dataset.classes[split.y], labels[rows[name]])  # rows keep their labels
        counts = np.bincount(split.y, minlength=len(class_sizes))
        for code, size in enumerate(class_sizes):
            # Each split holds its fraction of every class, within one sample.
            assert abs(counts[code] - fractions[name] * size) <= 1 + 1e-9, (name, code)


def test_split_is_reproducible_for_a_seed_and_differs_for_another():
    rng = np.random.default_rng(2)
    x, labels = _labelled_pool(rng, [60, 40, 25])

    def rows(seed):
        dataset = split_dataset(x, labels, 0.2, 0.2, seed=seed)
        return {name: _rows(split) for name, split in dataset.splits().items()}

    first, again, other = rows(7), rows(7), rows(8)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[name], other[name]) for name in ("train", "valid", "test"))
    assert not np.array_equal(first["test"], other["test"])


@pytest.mark.parametrize(
    "labels",
    [
        np.array([3, -1, 7, 3, 7, 7, -1, 3] * 5),
        np.array(["cat", "dog", "bird", "dog", "cat", "cat", "bird", "dog"] * 5),
        np.array([b"no", b"yes", b"yes", b"no"] * 10),
        np.array([2.0, 0.0, 5.0, 2.0, 0.0, 5.0, 5.0, 2.0] * 5),
        np.array([1, 0, 0, 1, 1, 0, 1, 0] * 5, dtype=np.uint8),
    ],
    ids=["int", "str", "bytes", "integral-float", "uint8"],
)
def test_labels_round_trip_through_classes(labels):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((len(labels), 2))
    dataset = split_dataset(x, labels, 0.2, 0.2, seed=0)
    np.testing.assert_array_equal(dataset.classes, np.unique(labels))
    for split in dataset.splits().values():
        assert split.y.dtype == np.int64
        assert split.y.min() >= 0 and split.y.max() < len(dataset.classes)
        rows = [int(np.flatnonzero((x == row).all(axis=1))[0]) for row in split.x]
        np.testing.assert_array_equal(dataset.classes[split.y], labels[rows])


@pytest.mark.parametrize("big", [2.0**63, 1e30, -1e20], ids=["2^63", "1e30", "-1e20"])
def test_integral_float_labels_beyond_int64_are_kept_or_refused_never_changed(big):
    labels = np.array([big, 1.0, 2 * big, big, 1.0] * 8)  # three distinct classes
    x = np.arange(len(labels), dtype=np.float32)
    try:
        dataset = split_dataset(x, labels, 0.2, 0.2, seed=0)
    except DataError:
        return
    assert len(dataset.classes) == 3
    for split in dataset.splits().values():
        np.testing.assert_array_equal(dataset.classes[split.y], labels[split.x.astype(np.int64)])


def test_negative_seed_is_either_used_reproducibly_or_refused_with_data_error():
    x, labels = _labelled_pool(np.random.default_rng(8), [20, 30])
    try:
        first = split_dataset(x, labels, 0.2, 0.2, seed=-1)
    except DataError:
        return
    again = split_dataset(x, labels, 0.2, 0.2, seed=-1)
    np.testing.assert_array_equal(first.test.x, again.test.x)


@pytest.mark.parametrize(
    "valid_fraction, test_fraction", [(0.0, 0.2), (0.1, 0.0), (0.5, 0.5), (0.6, 0.5), (-0.1, 0.2), (0.1, 1.0)]
)
def test_split_rejects_bad_fractions(valid_fraction, test_fraction):
    x, labels = _labelled_pool(np.random.default_rng(4), [20, 20])
    with pytest.raises(DataError, match="fraction"):
        split_dataset(x, labels, valid_fraction, test_fraction)


READY_SPLITS = "give ready splits instead (x_train/y_train, x_valid/y_valid, x_test/y_test in the .npz)"


def test_too_few_samples_per_class_says_how_many_a_class_needs_and_how_many_it_has():
    labels = np.repeat(np.arange(1000), 2)  # 1000 classes of 2 samples
    with pytest.raises(DataError) as caught:
        split_dataset(np.zeros((len(labels), 3)), labels)
    assert str(caught.value) == (
        "data: too few samples per class for three splits: at valid fraction 0.1 and test fraction 0.2 a class "
        "needs at least 6 samples to reach every split, and the largest class has 2 (the valid and test splits "
        f"would be empty); add samples, or {READY_SPLITS}"
    )


def test_too_few_samples_names_the_one_split_left_empty_and_the_largest_class():
    x, labels = _labelled_pool(np.random.default_rng(9), [3, 4, 2])
    with pytest.raises(DataError) as caught:
        split_dataset(x, labels, 0.1, 0.3, where="pool.npz")
    assert str(caught.value) == (
        "pool.npz: too few samples per class for three splits: at valid fraction 0.1 and test fraction 0.3 a "
        "class needs at least 6 samples to reach every split, and the largest class has 4 (the valid split would "
        f"be empty); add samples, or {READY_SPLITS}"
    )
    split_dataset(*_labelled_pool(np.random.default_rng(9), [6, 2, 2]), 0.1, 0.3)  # one class of 6 is enough


@pytest.mark.parametrize("fractions", [[0.2, 0.1], [0.3, 0.15], [0.05, 0.05], [0.25, 0.25], [0.5, 0.45], [0.01, 0.9]])
def test_the_class_size_needed_is_where_every_larger_class_reaches_every_split(fractions):
    needed = _class_size_needed(fractions)
    assert all(min(_split_sizes(size, fractions)) >= 1 for size in range(needed, 2000))
    assert min(_split_sizes(needed - 1, fractions)) == 0


# --- load_dataset ----------------------------------------------------------------------------------------


def _ready(n_train=8, n_test=4, y_train=None, y_test=None, **extra):
    """Ready train/test splits of two alternating classes (label arrays may be given instead)."""
    return dict(
        x_train=np.zeros((n_train, 2)),
        y_train=np.array([0, 1] * (n_train // 2)) if y_train is None else y_train,
        x_test=np.zeros((n_test, 2)),
        y_test=np.array([0, 1] * (n_test // 2)) if y_test is None else y_test,
        **extra,
    )


def _save(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_load_ready_splits_keeps_them_as_given(tmp_path):
    rng = np.random.default_rng(5)
    parts = {name: (rng.standard_normal((n, 4)).astype(np.float32), rng.choice(["a", "b", "c"], size=n))
             for name, n in (("train", 40), ("valid", 12), ("test", 15))}
    path = _save(tmp_path, **{f"{axis}_{name}": part[i] for name, part in parts.items() for i, axis in enumerate("xy")})
    dataset = load_dataset(path)
    np.testing.assert_array_equal(dataset.classes, ["a", "b", "c"])
    for name, split in dataset.splits().items():
        x, y = parts[name]
        np.testing.assert_array_equal(split.x, x)
        np.testing.assert_array_equal(dataset.classes[split.y], y)


def test_load_pool_x_y_is_split_as_split_dataset_does(tmp_path):
    rng = np.random.default_rng(6)
    x, labels = _labelled_pool(rng, [30, 45, 25])
    loaded = load_dataset(_save(tmp_path, x=x, y=labels), valid_fraction=0.15, test_fraction=0.25, seed=9)
    direct = split_dataset(x, labels, 0.15, 0.25, seed=9)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(loaded.splits()[name].x, direct.splits()[name].x)
        np.testing.assert_array_equal(loaded.splits()[name].y, direct.splits()[name].y)
    assert sum(len(split) for split in loaded.splits().values()) == len(labels)


def test_load_train_and_test_without_valid_carves_valid_from_train(tmp_path):
    rng = np.random.default_rng(7)
    x_train, y_train = _labelled_pool(rng, [40, 60])
    x_test = rng.standard_normal((20, 3)).astype(np.float32)
    y_test = rng.integers(0, 2, size=20)
    dataset = load_dataset(_save(tmp_path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test), 0.2)
    np.testing.assert_array_equal(dataset.test.x, x_test)
    np.testing.assert_array_equal(dataset.test.y, y_test)
    train_rows, valid_rows = _rows(dataset.train), _rows(dataset.valid)
    assert len(np.intersect1d(train_rows, valid_rows)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_rows, valid_rows])), np.arange(100))
    assert np.all(np.abs(np.bincount(dataset.valid.y) - 0.2 * np.array([40, 60])) <= 1)  # 20% of each class
    np.testing.assert_array_equal(dataset.classes[dataset.valid.y], y_train[valid_rows])


# --- load_dataset refusals -------------------------------------------------------------------------------


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nothing.npz")


@pytest.mark.parametrize("content", [b"this is not an archive\n", b"PK\x03\x04 truncated zip", b""])
def test_a_file_that_is_not_an_npz_is_a_data_error(tmp_path, content):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="npz"):
        load_dataset(path)


SAVE_NPZ = "numpy.savez('data.npz', x=inputs, y=labels)"


def _refusal(path) -> str:
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    return str(caught.value)


@pytest.mark.parametrize("name", ["data.npy", "data.npz"])  # told by its content, whatever its name
def test_a_plain_npy_file_says_it_holds_one_array_and_how_to_save_inputs_with_labels(tmp_path, name):
    path = tmp_path / name
    with path.open("wb") as stream:
        np.save(stream, np.zeros((10, 28, 28), np.float32))
    assert _refusal(path) == (
        f"{path} is a .npy file, which holds one array (shape (10, 28, 28), float32): inputs alone, no labels; "
        f"save inputs and labels together with {SAVE_NPZ}, or ready splits as x_train, y_train, x_test, y_test "
        "(x_valid, y_valid optional)"
    )


def test_a_npy_file_of_python_objects_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "data.npy"
    np.save(path, np.array([{"image": 1}, None], dtype=object), allow_pickle=True)
    assert _refusal(path) == (
        f"{path} is a .npy file of Python objects (dtype object), which numpy reads only by unpickling and "
        f"probecore does not (it can run code); save numeric or string arrays with {SAVE_NPZ}"
    )


def test_a_npz_with_object_arrays_names_them(tmp_path):
    path = _save(tmp_path, x=np.zeros((4, 2)), y=np.array(["cat", 1, None, "dog"], dtype=object))
    assert _refusal(path) == (
        f"{path}: y holds Python objects (dtype object), which numpy reads only by unpickling and probecore does "
        "not (it can run code); save numeric or string arrays instead (e.g. labels.astype(str), inputs padded to "
        "one shape)"
    )


def test_a_pickle_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"x": [[0.0, 1.0]], "y": [0]}))
    assert _refusal(path) == (
        f"{path} is a Python pickle, which probecore does not load (unpickling can run code); save inputs and "
        f"labels as arrays with {SAVE_NPZ}"
    )


def test_a_csv_file_is_told_to_be_read_and_saved_as_npz(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("pixel0,pixel1,label\n0.5,0.25,cat\n0.0,1.0,dog\n")
    assert _refusal(path) == (
        f"{path} is a text file (CSV or similar), not a .npz archive; read it with numpy.loadtxt or pandas, then "
        f"save inputs and labels with {SAVE_NPZ}"
    )


@pytest.mark.parametrize(
    "content, says",
    [(b"", "is empty"), (b"PK\x03\x04 truncated zip", "is a damaged .npz (zip) archive (File is not a zip file)"),
     (bytes(range(256)), "is neither a .npz archive nor a .npy array (it starts with b'\\x00\\x01")],
)  # fmt: skip
def test_other_unreadable_files_say_what_they_are_in_one_line(tmp_path, content, says):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    message = _refusal(path)
    assert message.startswith(f"{path} {says}") and message.endswith(SAVE_NPZ) and "\n" not in message


@pytest.mark.parametrize(
    "keys",
    [["features", "targets"], ["x"], ["x_train", "y_train", "x_test"], ["inputs", "y"]],
)
def test_missing_keys_is_a_data_error_listing_the_keys_found(tmp_path, keys):
    path = _save(tmp_path, **{key: np.arange(6) for key in keys})
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert "x_train" in message and "found" in message
    for key in keys:
        assert key in message.split("found")[-1]


@pytest.mark.parametrize(
    "arrays",
    [
        dict(x=np.zeros((10, 2)), y=np.array([0, 1] * 6)),
        {**_ready(), "x_train": np.zeros((10, 2))},
        {**_ready(), "x_test": np.zeros((5, 2))},
    ],
    ids=["pool", "train", "test"],
)
def test_x_and_y_of_different_lengths_is_a_data_error(tmp_path, arrays):
    with pytest.raises(DataError, match="samples but"):
        load_dataset(_save(tmp_path, **arrays))


@pytest.mark.parametrize(
    "arrays",
    [
        dict(x=np.zeros((10, 2)), y=np.full(10, 4)),
        _ready(y_train=np.full(8, 1), y_test=np.full(4, 1)),
        _ready(y_train=np.full(8, 1)),
    ],
    ids=["pool", "all-splits", "train-only"],
)
def test_a_single_class_is_a_data_error(tmp_path, arrays):
    with pytest.raises(DataError, match="two classes"):
        load_dataset(_save(tmp_path, **arrays))


@pytest.mark.parametrize("present", ["x_valid", "y_valid"])
def test_only_one_of_x_valid_and_y_valid_is_a_data_error(tmp_path, present):
    arrays = _ready()
    arrays[present] = np.zeros((4, 2)) if present == "x_valid" else np.array([0, 1] * 2)
    with pytest.raises(DataError, match="x_valid and y_valid"):
        load_dataset(_save(tmp_path, **arrays))


@pytest.mark.parametrize(
    "arrays",
    [
        dict(x=np.zeros((10, 2)), y=np.array([0.0, 1.5] * 5)),
        dict(x=np.zeros((10, 2)), y=np.array([0.0, 1.0, np.nan, 1.0, 0.0] * 2)),
        _ready(y_train=np.array([0.0, 1.0] * 4), y_test=np.array([0.0, 0.5] * 2)),
    ],
    ids=["fractional", "nan", "fractional-test"],
)
def test_non_integer_float_labels_are_a_data_error(tmp_path, arrays):
    with pytest.raises(DataError, match="non-integer"):
        load_dataset(_save(tmp_path, **arrays))


def test_every_class_keeps_a_training_sample_whatever_the_fractions():
    # found by hypothesis: 4 samples of a class at valid and test fractions 0.375 rounded to 2 + 2, none to train
    labels = np.array([0, 1, 1, 1, 1, 0, 0])
    dataset = split_dataset(np.arange(7.0)[:, None], labels, 0.375, 0.375, seed=0)
    assert set(dataset.train.y.tolist()) == {0, 1}


@pytest.mark.parametrize("shape, dtype", [((), np.int64), ((3, 5, 5), np.float32), ((7,), np.uint8), ((2,), np.float16)])
@pytest.mark.parametrize("ready_splits", [False, True])
def test_a_loaded_file_is_split_in_place_into_the_rows_a_copy_would_give(tmp_path, shape, dtype, ready_splits):
    rng = np.random.default_rng([60, len(shape)])
    x = (rng.standard_normal((301, *shape)) * 100).astype(dtype)
    y = rng.integers(0, 4, 301)
    path = tmp_path / "data.npz"
    if ready_splits:  # no valid split: carved out of train
        np.savez(path, x_train=x[:250], y_train=y[:250], x_test=x[250:], y_test=y[250:])
        expected = dataset_from_splits({"train": x[:250].copy(), "test": x[250:]}, {"train": y[:250], "test": y[250:]})
    else:
        np.savez(path, x=x, y=y)
        original = x.copy()
        expected = split_dataset(x, y, 0.1, 0.2, seed=0)
        np.testing.assert_array_equal(x, original)  # the caller's array is left as it was
    loaded = load_dataset(path, 0.1, 0.2, seed=0)
    for name, split in loaded.splits().items():
        np.testing.assert_array_equal(split.x, expected.splits()[name].x)
        np.testing.assert_array_equal(split.y, expected.splits()[name].y)
    assert loaded.train.x.base is not None and loaded.train.x.base is loaded.valid.x.base  # views of one array
