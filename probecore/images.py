"""Image folders as model inputs, read from disk batch by batch and never loaded whole.

``ImageFolder`` takes torchvision's layout, one subfolder per class::

    root/cat/0001.jpg
    root/cat/more/0002.png
    root/dog/0003.jpeg

and behaves like an (N, C, H, W) array as far as the pipeline needs: ``len``, ``shape``, ``dtype``, a slice
loads and preprocesses just those images, and an integer index array gives a lazy subset view (which is what
splitting does), so only the batch being fed is ever in memory.

Pillow is imported inside the functions that read images, so ``import probecore`` stays numpy-only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The Pillow decoders these extensions call for; any other (EPS, PDF, ...) is refused even if a file's bytes
# claim it, so a mislabelled file never reaches a decoder that runs external programs.
_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "WEBP", "TIFF")
_DTYPES = ("float32", "float16", "float64", "uint8")
ON_ERROR = ("skip", "fail")
# Decoding threads by default: every available core (Pillow releases the GIL while it decodes and resizes, and
# a GPU needs them all: benchmarks/README.md, "Decoding images"), within reason on very large machines.
MAX_WORKERS = 32


@dataclass(frozen=True)
class ImagePreprocessing:
    """How each image becomes model input: resize the short side, center-crop, scale, normalize, layout.

    Like torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` + ``ToTensor`` + ``Normalize(mean, std)``
    on a Pillow image: the short side becomes ``resize`` (bilinear, the long side ``int(resize * long /
    short)``), the centre ``size`` x ``size`` square is kept (offsets rounded as torchvision does), pixels
    are multiplied by ``scale``, then ``mean`` is subtracted and ``std`` divided out per channel. EXIF
    orientation is not applied (torchvision's loader does not either). Images are converted to RGB (``L``
    with ``grayscale``); an alpha channel is dropped, not composited.

    ``dtype="uint8"`` feeds the raw pixels, and so needs ``scale=1``, ``mean=0`` and ``std=1``.
    """

    size: int = 224  # output height = width
    resize: int | None = None  # short side before the crop; None = size * 256 // 224 (the ImageNet habit)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # subtracted after scaling pixels by `scale`
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    channels_last: bool = False  # (N, H, W, C) instead of (N, C, H, W)
    grayscale: bool = False  # 1 channel (mean/std then use their first value)
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise DataError(f"image size must be a positive integer, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        if self.resize is not None:
            is_int = isinstance(self.resize, (int, np.integer)) and not isinstance(self.resize, bool)
            if not is_int or self.resize < self.size:
                raise DataError(
                    f"image resize must be an integer of at least size ({self.size}), got {self.resize!r}; "
                    "the center crop must fit inside the resized image"
                )
            object.__setattr__(self, "resize", int(self.resize))
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                values = tuple(float(v) for v in np.atleast_1d(values))
            except (TypeError, ValueError):
                raise DataError(f"image {name} must be 3 numbers (one per RGB channel), got {values!r}") from None
            if len(values) == 1:
                values = values * 3
            if len(values) != 3 or not all(np.isfinite(values)):
                raise DataError(f"image {name} must be 3 finite numbers (one per RGB channel), got {values!r}")
            object.__setattr__(self, name, values)
        if any(s == 0 for s in self.std):
            raise DataError(f"image std must not contain 0, got {self.std}")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            scale = float("nan")
        if not np.isfinite(scale) or scale == 0:
            raise DataError(f"image scale must be a finite nonzero number, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        dtype = np.dtype(self.dtype).name if _is_dtype(self.dtype) else str(self.dtype)
        if dtype not in _DTYPES:
            raise DataError(f"image dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        if dtype == "uint8" and not self.is_identity():
            raise DataError("image dtype uint8 feeds raw pixels; set scale=1, mean=0 and std=1, or use a float dtype")

    @property
    def resize_to(self) -> int:
        """The short side before the crop, with the default filled in."""
        return self.resize if self.resize is not None else self.size * 256 // 224

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def sample_shape(self) -> tuple[int, int, int]:
        c, s = self.channels, self.size
        return (s, s, c) if self.channels_last else (c, s, s)

    def is_identity(self) -> bool:
        """True when pixel values pass through unchanged (scale 1, mean 0, std 1)."""
        c = self.channels
        return self.scale == 1 and all(m == 0 for m in self.mean[:c]) and all(s == 1 for s in self.std[:c])

    def describe(self) -> dict:
        """JSON-able and complete, for cache keys and reports; equal for settings that give equal inputs."""
        c = self.channels
        return {
            "kind": "image",
            "size": self.size,
            "resize": self.resize_to,
            "interpolation": "bilinear",
            "crop": "center",
            "mode": "L" if self.grayscale else "RGB",
            "scale": self.scale,
            "mean": list(self.mean[:c]),
            "std": list(self.std[:c]),
            "layout": "NHWC" if self.channels_last else "NCHW",
            "dtype": self.dtype,
        }

    def apply(self, image, out: np.ndarray | None = None) -> np.ndarray:
        """One Pillow image to one model input of ``sample_shape()`` and ``dtype``, written into ``out`` if given."""
        from PIL import Image

        image = _to_mode(image, "L" if self.grayscale else "RGB")
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_to, int(self.resize_to * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        if new_size != image.size:
            image = image.resize(new_size, Image.BILINEAR)
        width, height = new_size
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)
        size, c = self.size, self.channels
        pixels = pixels.reshape(size, size, c)
        if out is None:
            out = np.empty(self.sample_shape(), dtype=self.dtype)
        # Views whose last axis is a whole row keep numpy's inner loops long: HWC as (H, W*C) with the channel
        # constants tiled along the row, CHW as (C, H, W) from transposed pixels. 3-wide loops were 3-10x slower.
        mean = np.asarray(self.mean[:c])
        std = np.asarray(self.std[:c])
        if self.channels_last:
            pixels = pixels.reshape(size, size * c)
            mean, std = np.tile(mean, size), np.tile(std, size)
        else:
            pixels = pixels.transpose(2, 0, 1)
            mean, std = mean[:, None, None], std[:, None, None]
        direct = out.flags.c_contiguous and self.dtype in ("float32", "float64", "uint8")
        work = out.reshape(pixels.shape) if direct else np.empty(pixels.shape, np.float32)
        if self.dtype == "uint8":
            work[...] = pixels
        else:
            np.multiply(pixels, work.dtype.type(self.scale), out=work)
            np.subtract(work, mean.astype(work.dtype), out=work)
            np.divide(work, std.astype(work.dtype), out=work)
        if not direct:
            out[...] = work.reshape(out.shape)
        return out


def _unreadable(path: Path, decode: bool) -> str | None:
    """Why ``path`` cannot be used as an image (one line), or None when it passes the check."""
    from PIL import Image

    try:
        with Image.open(path, formats=_open_formats()) as image:
            _check_mode(image)
            if decode:
                image.load()
            else:
                image.verify()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        return _reason(exc)
    return None


def _check_mode(image) -> None:
    """Refuse pixels with no fixed range (32-bit integer or float), which Pillow would silently clip to 0..255."""
    if image.mode in ("I", "F"):
        raise ValueError(f"mode {image.mode} (32-bit or float pixels) has no fixed range; save it as 8-bit")


def _to_mode(image, mode: str):
    """``image.convert(mode)``, but 16-bit grayscale keeps its high byte instead of being clipped at 255."""
    from PIL import Image

    _check_mode(image)
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), "L")
    return image if image.mode == mode else image.convert(mode)  # convert() to the same mode copies


def _is_dtype(value) -> bool:
    try:
        np.dtype(value)
    except TypeError:
        return False
    return True


class ImageFolder:
    """A lazy, array-like view of an image folder with one subfolder per class (torchvision's layout).

    Discovery: the class folders are root's subfolders sorted by name; the images are the files inside each
    (recursively) whose extension is one of ``EXTENSIONS`` in any case, sorted by their path inside the class
    folder. Hidden files and folders (names starting with ``.``) and files directly in root are ignored.
    ``labels`` holds each image's class folder name and ``classes`` the sorted class names; ``paths`` is built
    on access from compactly stored names (tens of bytes per image).

    Indexing: ``folder[a:b]`` (or an int) loads and preprocesses just those images into an ndarray; an integer
    (or boolean) index array gives a new lazy ``ImageFolder`` over those rows, loading nothing. ``np.asarray``
    on a folder is refused, so nothing reads a whole folder into memory by accident; use ``folder[:]``.

    Unreadable images (corrupt, truncated, not an image): rows must never shift once a split is made, so a
    batch never drops or pads an image. Instead, with ``on_error="skip"`` (the default) the constructor calls
    ``verify()``, which checks every file's header with Pillow (fast, nothing is decoded) and drops those that
    fail (and 32-bit or float images, whose pixels have no fixed range), recording ``(path, reason)`` in
    ``skipped``, before any index exists. A file that passes the header
    check but still fails to decode later (typically a truncated JPEG) raises ``DataError`` naming it; call
    ``verify(decode=True)`` before splitting to catch those too, at the cost of decoding everything once.
    With ``on_error="fail"`` nothing is checked up front and the first unreadable file raises ``DataError``
    when its batch is loaded (``verify()`` raises for the first bad file instead of dropping it).

    Missing, empty or single-class folders, and a class folder with no (readable) images, raise ``DataError``.

    Pass ``paths`` and ``labels`` (same length; relative paths are taken under ``root``) to use a given list
    of images instead of discovering them. ``workers`` threads decode each batch (Pillow
    releases the GIL while decoding and resizing), from one pool per process kept between batches; the
    default is one per available core (at most ``MAX_WORKERS``). A folder pickles small (no open files, no
    threads), so it can be sent to worker processes.
    """

    def __init__(
        self,
        root: str | Path,
        preprocessing: ImagePreprocessing = ImagePreprocessing(),
        on_error: str = "skip",
        paths: Sequence[str | Path] | None = None,
        labels: Sequence | np.ndarray | None = None,
        *,
        workers: int | None = None,
    ):
        if on_error not in ON_ERROR:
            raise DataError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if not isinstance(preprocessing, ImagePreprocessing):
            raise DataError(f"preprocessing must be an ImagePreprocessing, got {type(preprocessing).__name__}")
        self.root = Path(root)
        self.preprocessing = preprocessing
        self.on_error = on_error
        self.workers = _default_workers() if workers is None else max(1, int(workers))
        self.skipped: list[tuple[Path, str]] = []
        if (paths is None) != (labels is None):
            raise DataError("give both paths and labels (one label per image), or neither to discover the folder")
        if paths is None:
            names, self.labels = _discover(self.root)
            self._names = _pack(names)
            self.classes = np.unique(self.labels)
            discovered = True
        else:
            self._names = _pack([_relative(self.root, Path(p)) for p in paths])
            self.labels = np.asarray(labels).astype(str)
            if self.labels.ndim != 1 or len(self.labels) != len(self._names):
                raise DataError(
                    f"{len(self._names)} image paths but labels of shape {self.labels.shape}; give one label per image"
                )
            self.classes = np.unique(self.labels)
            discovered = False
        if on_error == "skip":
            self.verify()
        if discovered:
            self._check_classes()

    @classmethod
    def _view(cls, parent: ImageFolder, rows: np.ndarray) -> ImageFolder:
        view = cls.__new__(cls)
        view.root = parent.root
        view.preprocessing = parent.preprocessing
        view.on_error = parent.on_error
        view.workers = parent.workers
        view.skipped = list(parent.skipped)
        view._names = parent._names[rows]
        view.labels = parent.labels[rows]
        view.classes = parent.classes
        return view

    # --- the array-like surface ---------------------------------------------------------------------------

    @property
    def paths(self) -> list[Path]:
        """Each row's image file. Built on access: rows are stored as packed relative names (a few dozen bytes
        each, not the ~400 of a Path), so an ImageNet-sized folder does not spend half a gigabyte on paths."""
        return self._paths(self._names)

    def _paths(self, names: np.ndarray) -> list[Path]:
        return [self.root / os.fsdecode(name) for name in names.tolist()]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self._names), *self.preprocessing.sample_shape())

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.preprocessing.dtype)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._load(self._paths(self._names[key]))
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            index = int(key)
            if not -len(self) <= index < len(self):
                raise IndexError(f"image index {index} is out of range for {len(self)} images")
            return self._load(self._paths(self._names[index : index + 1 or None]))[0]
        if isinstance(key, (list, np.ndarray, range)):
            return self.subset(key)
        raise TypeError(
            f"ImageFolder takes an int, a slice, or a 1-D integer or boolean index array, not {type(key).__name__}"
        )

    def subset(self, rows) -> ImageFolder:
        """A lazy view of ``rows`` (1-D integer positions, negatives allowed, or a boolean mask); nothing is loaded."""
        rows = np.asarray(rows)
        if rows.ndim != 1:
            raise IndexError(f"ImageFolder rows must be one-dimensional, got shape {rows.shape}")
        if rows.dtype == bool:
            if len(rows) != len(self):
                raise IndexError(f"boolean mask of length {len(rows)} for {len(self)} images")
            rows = np.flatnonzero(rows)
        elif rows.size == 0:
            rows = rows.astype(np.int64)
        elif rows.dtype.kind not in "iu":
            raise IndexError(f"ImageFolder rows must be integers or a boolean mask, got dtype {rows.dtype}")
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} are out of range for {len(self)} images")
        return ImageFolder._view(self, np.where(rows < 0, rows + len(self), rows))

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            f"ImageFolder reads {len(self)} images batch by batch and is not turned into one array implicitly; "
            "slice it (folder[start:stop]) to load a batch, or folder[:] to load everything"
        )

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (
            f"ImageFolder({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes, "
            f"shape={self.shape}, dtype={self.dtype})"
        )

    # --- reading ------------------------------------------------------------------------------------------

    def _load(self, paths: list[Path]) -> np.ndarray:
        out = np.empty((len(paths), *self.preprocessing.sample_shape()), dtype=self.dtype)

        def load_into(index: int) -> None:
            self._load_one(paths[index], out[index])

        if min(self.workers, len(paths)) <= 1:
            for index in range(len(paths)):
                load_into(index)
        else:
            for _ in _decoders(self.workers).map(load_into, range(len(paths))):  # re-raises the first error
                pass
        return out

    def _load_one(self, path: Path, out: np.ndarray) -> None:
        from PIL import Image

        try:
            with Image.open(path, formats=_open_formats()) as image:
                self.preprocessing.apply(image, out)
        except DataError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
            raise DataError(
                f"cannot read image {path}: {_reason(exc)}; delete or replace the file "
                "(ImageFolder.verify(decode=True) before splitting skips such files)"
            ) from None

    def verify(self, decode: bool = False) -> list[tuple[Path, str]]:
        """Check every image and drop those that cannot be read; return the ``(path, reason)`` pairs dropped.

        By default only headers are checked (Pillow's ``verify``: no pixels are decoded, ~40k small files/s
        here with a warm disk cache); ``decode=True`` fully decodes every image, which also catches truncated
        files, at the cost of decoding everything once. Images whose pixels have no fixed range (32-bit
        integer or float) fail too. Dropped images are appended to ``skipped``. With ``on_error="fail"`` the
        first unreadable image raises ``DataError`` instead. ``decode=True`` uses the ``workers`` threads.
        Call it before making splits or subsets: it renumbers rows.
        """
        keep = np.ones(len(self._names), dtype=bool)
        dropped: list[tuple[Path, str]] = []
        block, task = 4096, 64  # bounded work at a time, never a Path per image of a huge folder at once

        def check(paths: list[Path]) -> list[str | None]:
            return [_unreadable(path, decode) for path in paths]

        # Header checks are mostly Python and hold the GIL: threads made them slower here (26 -> 37 ms per
        # 1000 files, warm cache) and barely faster with the files evicted from the page cache. Decoding
        # releases the GIL, so only decode=True uses the threads.
        threaded = decode and self.workers > 1

        with ThreadPoolExecutor(self.workers, thread_name_prefix="probecore-verify") as pool:
            for start in range(0, len(self._names), block):
                paths = self._paths(self._names[start : start + block])
                tasks = [paths[i : i + task] for i in range(0, len(paths), task)]
                reasons = [r for part in (pool.map(check, tasks) if threaded else map(check, tasks)) for r in part]
                for offset, (path, reason) in enumerate(zip(paths, reasons)):
                    if reason is None:
                        continue
                    if self.on_error == "fail":
                        raise DataError(
                            f"cannot read image {path}: {reason}; delete or replace the file, "
                            "or use on_error='skip' to leave unreadable images out"
                        )
                    keep[start + offset] = False
                    dropped.append((path, reason))
        if dropped:
            self._names = self._names[keep]
            self.labels = self.labels[keep]
            self.skipped.extend(dropped)
        return dropped

    def _check_classes(self) -> None:
        present = set(np.unique(self.labels).tolist())
        for name in self.classes.tolist():
            if name not in present:
                first = next((f"{p}: {why}" for p, why in self.skipped if _class_of(self.root, p) == name), "?")
                raise DataError(
                    f"every image of class {name!r} in {self.root} is unreadable (first: {first}); "
                    "replace them or remove the class folder"
                )
        if len(self.classes) < 2:
            only = f" ({self.classes[0]!r})" if len(self.classes) else ""
            raise DataError(
                f"{self.root} has a single class folder{only}; a probe needs at least two, "
                "so put each class's images in its own subfolder"
            )

    def fingerprint(self) -> str:
        """A sha256 over each image's path relative to ``root``, label, size and mtime (ns), in row order,
        and the preprocessing, so cached features are reused only for the same files prepared the same way."""
        digest = hashlib.sha256()
        header = {"preprocessing": self.preprocessing.describe(), "n": len(self)}
        digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        for name, label in zip(self._names, self.labels):
            name = bytes(name)
            path = self.root / os.fsdecode(name)
            try:
                stat = os.stat(path)
            except OSError as exc:
                raise DataError(f"cannot read image {path}: {_reason(exc)}; was it moved or deleted?") from None
            digest.update(b"\n%s\0%s\0%d\0%d" % (name, label.encode(), stat.st_size, stat.st_mtime_ns))
        return digest.hexdigest()

    def describe(self) -> dict:
        """Facts worth recording in a report."""
        return {
            "source": "image_folder",
            "root": str(self.root),
            "images": len(self),
            "classes": len(self.classes),
            "skipped": len(self.skipped),
            "preprocessing": self.preprocessing.describe(),
        }


def _discover(root: Path) -> tuple[list[str], np.ndarray]:
    if not root.exists():
        raise DataError(f"image folder not found: {root}; pass an existing folder with one subfolder per class")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder with one subfolder per class (root/<class>/<image>)")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {root}: {_reason(exc)}") from None
    visible = [e for e in entries if not e.name.startswith(".")]
    if not visible:
        raise DataError(f"{root} is empty; put the images in one subfolder per class (root/<class>/<image>)")
    class_dirs = [e for e in visible if e.is_dir()]
    if not class_dirs:
        raise DataError(
            f"{root} has no class subfolders; put the images in one subfolder per class (root/<class>/<image>)"
        )
    if len(class_dirs) == 1:
        raise DataError(
            f"{root} has a single class folder ({class_dirs[0].name!r}); a probe needs at least two, "
            "so put each class's images in its own subfolder"
        )
    names: list[str] = []
    labels: list[str] = []
    for entry in class_dirs:
        found = _images_under(entry.path)
        if not found:
            raise DataError(
                f"class folder {entry.path} holds no images ({' '.join(EXTENSIONS)}); add some or remove the folder"
            )
        prefix = entry.name + os.sep
        names.extend(prefix + name for name in found)
        labels.extend([entry.name] * len(found))
    return names, np.asarray(labels, dtype=str)


def _images_under(folder: str) -> list[str]:
    """Image files under ``folder`` (relative to it), recursively, skipping hidden names, sorted by their path
    components."""
    found: list[tuple[tuple[str, ...], str]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        parts = () if rel == "." else tuple(Path(rel).parts)
        prefix = os.path.join(*parts, "") if parts else ""
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                found.append(((*parts, name), prefix + name))
    found.sort()
    return [relative for _, relative in found]


def _pack(names: Sequence[str]) -> np.ndarray:
    """Names as one fixed-width bytes array (the file system's encoding), compact and cheap to index."""
    if not names:
        return np.empty(0, dtype="S1")
    return np.array([os.fsencode(name) for name in names], dtype=bytes)


@functools.cache
def _open_formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def _default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


@functools.cache
def _decoders(workers: int) -> ThreadPoolExecutor:
    """The decoding threads of every folder asking for ``workers`` of them: made once (starting threads for every
    batch cost more than small images take to decode), idle between batches."""
    return ThreadPoolExecutor(workers, thread_name_prefix="probecore-images")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _relative(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` where it lies under it (as given, if relative), else absolute."""
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _class_of(root: Path, path: Path) -> str | None:
    try:
        return path.relative_to(root).parts[0]
    except (ValueError, IndexError):
        return None
