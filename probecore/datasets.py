"""Labelled inputs split three ways, from a .npz file or from arrays.

An image folder (one subfolder per class) is split the same way and read lazily, a batch at a time. A data
file holds either ready splits (``x_train``/``y_train``, ``x_valid``/``y_valid``, ``x_test``/
``y_test``; the valid pair may be left out) or one pool ``x``/``y`` that is split here, stratified by label
and seeded, so every run with the same seed sees the same samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

SPLITS = ("train", "valid", "test")
SAVE_NPZ = "numpy.savez('data.npz', x=inputs, y=labels)"  # how every refused data file is told to be saved
# Bytes found in text files (the heuristic of file(1)): a head made only of these is text, e.g. a CSV file.
TEXT_BYTES = bytes({7, 8, 9, 10, 12, 13, 27} | set(range(0x20, 0x100)) - {0x7F})


def pack_inputs(**arrays: np.ndarray) -> np.ndarray:
    """One structured array, (N,), with a field per model input, e.g.
    ``pack_inputs(input_ids=ids, attention_mask=mask)``: how a model with several inputs is fed (and saved
    in a .npz file as ``x``). Each field keeps its array's dtype and per-sample shape."""
    if not arrays:
        raise DataError("pack_inputs needs at least one array, named as the model input it feeds")
    values = {name: np.asarray(array) for name, array in arrays.items()}
    lengths = {name: len(array) for name, array in values.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"every input needs the same number of samples, got {lengths}")
    dtype = [(name, array.dtype, array.shape[1:]) for name, array in values.items()]
    packed = np.empty(next(iter(lengths.values())), dtype=dtype)
    for name, array in values.items():
        packed[name] = array
    return packed


@dataclass
class Split:
    """Inputs ``x`` (N, ...) and their encoded labels ``y`` (N,) int64, positions in ``Dataset.classes``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """Train, valid and test splits sharing one label encoding."""

    train: Split
    valid: Split
    test: Split
    classes: np.ndarray  # the original label values, sorted; labels are encoded as positions in it

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "valid": self.valid, "test": self.test}


def load_dataset(
    path: str | Path, valid_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, preprocessing=None
) -> Dataset:
    """Read a .npz data file (see the module docstring for its keys), or an image folder with one subfolder per
    class, read lazily batch by batch and preprocessed by ``preprocessing`` (an ``ImagePreprocessing``)."""
    path = Path(path)
    if path.is_dir():
        from .images import ImageFolder, ImagePreprocessing

        folder = ImageFolder(path, preprocessing or ImagePreprocessing())
        return split_dataset(folder, folder.labels, valid_fraction, test_fraction, seed, where=str(path))
    if not path.is_file():
        raise DataError(f"data file not found: {path}; pass an existing .npz file or image folder with --data")
    arrays = _read_npz(path)
    keys = set(arrays)
    split_keys = {f"{axis}_{name}" for axis in "xy" for name in ("train", "test")}
    if split_keys <= keys:
        if ("x_valid" in keys) != ("y_valid" in keys):
            raise DataError(f"{path} has only one of x_valid and y_valid; add the other or drop both")
        xs = {name: arrays.get(f"x_{name}") for name in SPLITS}
        ys = {name: arrays.get(f"y_{name}") for name in SPLITS}
        for name in SPLITS:
            if xs[name] is not None:
                _check_pair(xs[name], ys[name], f"{path}: x_{name}/y_{name}")
        return _from_splits(xs, ys, valid_fraction, seed, owned=True)
    if {"x", "y"} <= keys:
        return _split(arrays["x"], arrays["y"], valid_fraction, test_fraction, seed, str(path), owned=True)
    found = ", ".join(sorted(keys)) or "none"
    raise DataError(
        f"{path} needs keys x_train, y_train, x_test, y_test (x_valid, y_valid optional) or x, y; "
        f"found: {found}"
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .npz file by key. Anything else is refused by what it holds, read from its content
    (whatever its name), with how to save a .npz instead; nothing is unpickled, as that can run code."""
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)  # mapped: a .npy is described, not read
    except Exception as exc:  # numpy raises several types for a file it cannot read without unpickling
        raise DataError(_not_npz(path, exc)) from None
    if isinstance(loaded, np.ndarray):
        raise DataError(
            f"{path} is a .npy file, which holds one array (shape {loaded.shape}, {loaded.dtype}): inputs alone, "
            f"no labels; save inputs and labels together with {SAVE_NPZ}, or ready splits as x_train, y_train, "
            "x_test, y_test (x_valid, y_valid optional)"
        )
    arrays, pickled = {}, []
    with loaded as archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if not _holds_objects(archive.zip.open(f"{key}.npy")):
                    message = f"{path}: array {key} cannot be read ({exc}); save it again with {SAVE_NPZ}"
                    raise DataError(message) from None
                pickled.append(key)
    if pickled:
        raise DataError(
            f"{path}: {', '.join(pickled)} hold{'s' if len(pickled) == 1 else ''} Python objects (dtype object), which "
            "numpy reads only by unpickling and probecore does not (it can run code); save numeric or string arrays "
            "instead (e.g. labels.astype(str), inputs padded to one shape)"
        )
    return arrays


def _not_npz(path: Path, exc: Exception) -> str:
    """What a file numpy could not read as a .npz holds, judged from its first bytes, and how to save one."""
    with path.open("rb") as stream:
        head = stream.read(2048)
    if not head:
        return f"{path} is empty; save inputs and labels with {SAVE_NPZ}"
    if head.startswith(b"\x93NUMPY"):
        if _holds_objects(path.open("rb")):
            return (f"{path} is a .npy file of Python objects (dtype object), which numpy reads only by "
                    f"unpickling and probecore does not (it can run code); save numeric or string arrays with "
                    f"{SAVE_NPZ}")  # fmt: skip
        return f"{path} is a .npy file numpy cannot read ({exc}); save inputs and labels with {SAVE_NPZ}"
    if head.startswith(b"\x80"):  # the opcode that starts every pickle since protocol 2
        return (f"{path} is a Python pickle, which probecore does not load (unpickling can run code); save inputs "
                f"and labels as arrays with {SAVE_NPZ}")  # fmt: skip
    if head.startswith(b"PK"):
        return f"{path} is a damaged .npz (zip) archive ({exc}); save it again with {SAVE_NPZ}"
    if not head.translate(None, TEXT_BYTES):
        return (f"{path} is a text file (CSV or similar), not a .npz archive; read it with numpy.loadtxt or pandas, "
                f"then save inputs and labels with {SAVE_NPZ}")  # fmt: skip
    return (f"{path} is neither a .npz archive nor a .npy array (it starts with {head[:8]!r}); save inputs and "
            f"labels with {SAVE_NPZ}")  # fmt: skip


def _holds_objects(stream) -> bool:
    """Whether the .npy array in ``stream`` has Python objects in its dtype (read from its header alone)."""
    with stream:
        try:
            version = np.lib.format.read_magic(stream)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return header(stream)[2].hasobject
        except ValueError:  # not a .npy header after all
            return False


def split_dataset(
    x: np.ndarray, y: np.ndarray, valid_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
    where: str = "data",
) -> Dataset:
    """Split one labelled pool into train/valid/test, stratified by label, reproducibly from ``seed``."""
    return _split(x, y, valid_fraction, test_fraction, seed, where, owned=False)


def _split(x, y, valid_fraction, test_fraction, seed, where, owned: bool) -> Dataset:
    if seed < 0:
        raise DataError(f"seed must be zero or positive, got {seed}")
    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise DataError(
            f"valid and test fractions must be in (0, 1) and sum below 1, got {valid_fraction} and {test_fraction}"
        )
    _check_pair(x, y, where)
    classes, codes = _encode(y, where)
    fractions = [test_fraction, valid_fraction]
    test_rows, valid_rows, train_rows = _stratified_rows(codes, fractions, seed)
    rows_by_split = {"train": train_rows, "valid": valid_rows, "test": test_rows}
    empty = [name for name in SPLITS if len(rows_by_split[name]) == 0]
    if empty:
        raise DataError(
            f"{where}: too few samples per class for three splits: at valid fraction {valid_fraction:g} and test "
            f"fraction {test_fraction:g} a class needs at least {_class_size_needed(fractions)} samples to reach every "
            f"split, and the largest class has {np.bincount(codes).max()} (the {' and '.join(empty)} "
            f"split{'s' if len(empty) > 1 else ''} would be empty); add samples, or give ready splits instead "
            f"(x_train/y_train, x_valid/y_valid, x_test/y_test in the .npz)"
        )
    xs = _rows_of(x, list(rows_by_split.values()), owned)
    splits = {name: Split(part, codes[rows]) for (name, rows), part in zip(rows_by_split.items(), xs)}
    return Dataset(splits["train"], splits["valid"], splits["test"], classes)


def _rows_of(x, parts: list[np.ndarray], owned: bool) -> list:
    """``[x[rows] for rows in parts]`` (the parts disjoint). Where ``x`` is an array read here (``owned``),
    its rows are instead reordered in place so that the parts are consecutive views of it: the inputs are
    held once, not twice while they are split (and the caller's arrays are never changed)."""
    if not (owned and isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable and x.size):
        return [x[rows] for rows in parts]
    from .kernels import permute_rows

    order = np.concatenate(parts)
    permute_rows(x[: len(order)].reshape(len(order), -1).view(np.uint8), order)
    ends = np.cumsum([len(rows) for rows in parts])
    return [x[end - len(rows) : end] for rows, end in zip(parts, ends)]


def dataset_from_splits(xs: dict, ys: dict, valid_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Build a Dataset from given splits; a missing valid split is carved out of train (stratified)."""
    return _from_splits(xs, ys, valid_fraction, seed, owned=False)


def _from_splits(xs: dict, ys: dict, valid_fraction: float, seed: int, owned: bool) -> Dataset:
    present = [name for name in SPLITS if xs.get(name) is not None]
    kinds = {name: "text" if np.asarray(ys[name]).dtype.kind in "US" else "numbers" for name in present}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"y_{name} holds {kind}" for name, kind in kinds.items())
        raise DataError(f"label types differ between splits ({listed}); use the same kind of label in every split")
    classes, _ = _encode(np.concatenate([np.asarray(ys[name]) for name in present]), "labels")
    splits = {name: Split(np.asarray(xs[name]), _codes(ys[name], classes)) for name in present}
    if "valid" not in splits:
        train = splits["train"]
        valid_rows, train_rows = _stratified_rows(train.y, [valid_fraction], seed)
        train_x, valid_x = _rows_of(train.x, [train_rows, valid_rows], owned)
        splits["train"] = Split(train_x, train.y[train_rows])
        splits["valid"] = Split(valid_x, train.y[valid_rows])
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise DataError(f"the {name} split is empty; every split needs samples")
    if len(np.unique(splits["train"].y)) < 2:
        raise DataError("the train split has a single class; a probe needs at least two classes to separate")
    return Dataset(splits["train"], splits["valid"], splits["test"], classes)


def _stratified_rows(codes: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Sorted row indices for each fraction of every class, then the rest, drawn reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(len(fractions) + 1)]
    for code in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == code))
        start = 0
        for part, size in zip(parts, _split_sizes(len(members), fractions)):
            part.append(members[start : start + size])
            start += size
    return [np.sort(np.concatenate(part)) for part in parts]


def _split_sizes(class_size: int, fractions: list[float]) -> list[int]:
    """How many of a class's samples each fraction takes (rounded), then the rest, which keeps at least one
    (a class the probe never trains on cannot be predicted): one rounding for the split and for the error that
    says how large a class must be."""
    sizes = [int(round(class_size * fraction)) for fraction in fractions]
    while class_size and sum(sizes) >= class_size:  # e.g. 4 samples at 0.375 and 0.375: 2 + 2, none left
        sizes[sizes.index(max(sizes))] -= 1
    return [*sizes, class_size - sum(sizes)]


def _class_size_needed(fractions: list[float]) -> int:
    """The class size from which on every split gets a sample of the class. Rounding can starve a split of a
    larger class after a smaller one fed them all (e.g. fractions 0.5 and 0.45: 5 samples fill three splits, 6
    do not), so this is the start of the run of sizes that all work, not the first size that does."""
    rest = 1 - sum(fractions)
    surely = int(np.ceil(max(2 / rest, *(1 / fraction for fraction in fractions))))  # each share above 1 / 2
    needed = surely
    while needed > 1 and min(_split_sizes(needed - 1, fractions)) > 0:
        needed -= 1
    return needed


def fingerprint(*arrays: np.ndarray) -> str:
    """A sha256 over array shapes, dtypes and bytes, to record exactly which data a run used."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _check_pair(x: np.ndarray, y: np.ndarray, where: str) -> None:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be one-dimensional (one label per sample), got shape {y.shape}")
    if np.ndim(x) < 1 or len(x) != len(y):
        raise DataError(
            f"{where}: {len(x) if np.ndim(x) else 0} samples but {len(y)} labels; give one label per sample"
        )
    if len(y) == 0:
        raise DataError(f"{where}: no samples; the data set is empty, pass one with labelled samples")


def _encode(labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        exact = np.isfinite(labels) & (labels == np.round(labels)) & (np.abs(labels) <= 2**53)
        if not np.all(exact):
            raise DataError(f"{where}: labels are non-integer floats; use integer or string class labels")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iubUS":
        raise DataError(f"{where}: labels have dtype {labels.dtype}; use integer or string class labels")
    classes, codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        only = classes[0].item() if hasattr(classes[0], "item") else classes[0]
        raise DataError(f"{where}: all labels are {only!r}; a probe needs at least two classes, so add samples of another")
    return classes, codes.astype(np.int64)


def _codes(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        labels = labels.astype(np.int64)
    return np.searchsorted(classes, labels).astype(np.int64)
