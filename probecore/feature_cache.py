"""A disk cache of reduced features: run the expensive forward passes once, fit probes as often as you like.

Each entry is a directory ``root/<sha256 of key and dtype>/`` holding

* ``lock``: flock'ed by the one run that uses the entry (and naming its pid, for the error others get);
* one ``.npy`` per layer, preallocated at full shape ``(n_samples, width)`` when the entry is created;
* ``manifest.json``: what the entry is, and how many rows (``completed``) are safely on disk.

Rows are only appended. Every write syncs its rows to disk first and then replaces the manifest atomically,
so the manifest never claims a row that is not there: after a crash, full disk or kill -9 the next ``open``
resumes from the recorded count, and rows written past it are simply written again. Anything that does not
check out (missing or corrupt manifest, other shapes, a truncated file) is discarded and started afresh.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import operator
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import CacheError

FORMAT_VERSION = 1
STORAGE_DTYPES = ("float32", "float16")
LOCK_NAME = "lock"
MANIFEST_NAME = "manifest.json"
_POLL_SECONDS = 0.1
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def canonical_json(value) -> str:
    """The one spelling of a JSON-able value, so equal keys hash equally whatever their dict order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_name(key: dict, storage_dtype: str) -> str:
    """Directory name of an entry: float16 and float32 copies of the same features are different entries."""
    return hashlib.sha256(canonical_json([key, storage_dtype]).encode()).hexdigest()[:24]


def layer_file_name(layer: str) -> str:
    """A file name safe on every file system (layer names hold '/', ':', spaces); the hash keeps it unique."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", layer).strip("._")[:48] or "layer"
    return f"{slug}-{hashlib.sha256(layer.encode()).hexdigest()[:12]}.npy"


class FeatureCache:
    """A directory of cache entries; each entry holds one split's reduced features for a set of layers."""

    def __init__(self, root: str | Path, storage_dtype: str = "float32"):
        if storage_dtype not in STORAGE_DTYPES:
            raise CacheError(f"cache storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")
        self.root = Path(root)
        self.storage_dtype = storage_dtype

    def entry_dir(self, key: dict) -> Path:
        return self.root / entry_name(key, self.storage_dtype)

    def open(
        self,
        key: dict,
        n_samples: int,
        widths: dict[str, int],
        wait_seconds: float = 600,
        on_wait: Callable[[str], None] | None = None,
    ) -> CacheEntry:
        """Open (create or resume) the entry for ``key``, holding its lock until the entry is closed.

        If another process holds the lock, wait up to ``wait_seconds`` (``on_wait`` gets one message when the
        wait starts, so a CLI can say why it is idle), then raise ``CacheError``. An entry whose manifest does
        not match ``n_samples``, ``widths`` and the storage dtype is discarded and restarted.
        """
        n_samples = operator.index(n_samples)
        widths = {str(layer): operator.index(width) for layer, width in widths.items()}
        if n_samples < 0 or not widths or min(widths.values()) < 0:
            raise ValueError(f"need n_samples >= 0 and at least one layer of width >= 0, got {n_samples}, {widths}")
        directory = self.entry_dir(key)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _acquire_lock(directory, wait_seconds, on_wait)
        try:
            return CacheEntry(directory, key, n_samples, widths, self.storage_dtype, lock_fd)
        except BaseException:
            _release_lock(lock_fd)
            raise


class CacheEntry:
    """One open entry; a context manager whose exit releases the lock. Made by ``FeatureCache.open``."""

    def __init__(self, directory: Path, key: dict, n_samples: int, widths: dict[str, int], storage_dtype: str, lock_fd):
        self.directory = directory
        self.key = key
        self.n_samples = n_samples
        self.widths = dict(widths)
        self.storage_dtype = storage_dtype
        self.files = {layer: layer_file_name(layer) for layer in widths}
        self._lock_fd = lock_fd
        self._dtype = np.dtype(storage_dtype)
        manifest, offsets = self._load_matching()
        if manifest is None:
            self._create()
        else:
            self._offsets = offsets
            self._completed = manifest["completed"]
            self._created = manifest["created"]

    @property
    def completed(self) -> int:
        """Rows written and recorded in the manifest; the next ``write`` starts here."""
        return self._completed

    @property
    def complete(self) -> bool:
        return self._completed == self.n_samples

    @property
    def closed(self) -> bool:
        return self._lock_fd is None

    @property
    def size_bytes(self) -> int:
        """Bytes the entry takes on disk (its files are preallocated, so this is the final size)."""
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())

    def write(self, start: int, features_by_layer: dict[str, np.ndarray]) -> None:
        """Append rows ``start..start+n`` of every layer at once; ``start`` must equal ``completed``.

        The rows are synced to disk before the manifest that records them, so an error or crash part way
        leaves the entry at the previous count (an ``OSError`` such as a full disk propagates).
        """
        self._check_open()
        if start != self._completed:
            raise ValueError(f"cache rows are written in order: expected start={self._completed}, got {start}")
        if set(features_by_layer) != set(self.widths):
            missing, extra = set(self.widths) - set(features_by_layer), set(features_by_layer) - set(self.widths)
            raise ValueError(
                f"write needs every layer of the entry at once: missing {sorted(missing)}, extra {sorted(extra)}"
            )
        rows_by_layer = {layer: self._as_rows(layer, features) for layer, features in features_by_layer.items()}
        counts = {len(rows) for rows in rows_by_layer.values()}
        if len(counts) != 1:
            raise ValueError(f"every layer needs the same number of rows, got {sorted(counts)}")
        n = counts.pop()
        if start + n > self.n_samples:
            raise ValueError(f"rows {start}..{start + n} do not fit an entry of {self.n_samples} samples")
        if n == 0:
            return
        for layer, rows in rows_by_layer.items():
            row_bytes = self.widths[layer] * self._dtype.itemsize
            _write_at(self.directory / self.files[layer], self._offsets[layer] + start * row_bytes, rows)
        self._write_manifest(start + n)
        self._completed = start + n

    def read(self) -> dict[str, np.ndarray]:
        """Every layer's ``(n_samples, width)`` features, memory-mapped read-only, in the storage dtype.

        Only a complete entry can be read, and only while it is open (after closing, another run may have
        restarted it). The arrays stay valid after closing: a restart unlinks files, it never rewrites them.
        """
        self._check_open()
        if not self.complete:
            raise ValueError(
                f"cache entry {self.directory} holds {self._completed} of {self.n_samples} samples; finish writing it"
            )
        return {layer: np.load(self.directory / name, mmap_mode="r") for layer, name in self.files.items()}

    def close(self) -> None:
        """Release the lock; idempotent. Nothing else needs closing: every write opens and closes its files."""
        if self._lock_fd is not None:
            _release_lock(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """Remove the entry's files and release it: for a run that failed, so it leaves nothing behind."""
        self._check_open()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.close()

    def __enter__(self) -> CacheEntry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        progress = f"{self._completed}/{self.n_samples} samples"
        return f"CacheEntry({str(self.directory)!r}, {progress}, {len(self.widths)} layers)"

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"cache entry {self.directory} is closed")

    def _as_rows(self, layer: str, features: np.ndarray) -> np.ndarray:
        """Features as C-ordered rows in the storage dtype; refuse values float16 would turn into inf."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.widths[layer]:
            raise ValueError(f"layer {layer!r}: expected (n, {self.widths[layer]}) features, got {features.shape}")
        with np.errstate(over="ignore"):  # overflow is reported below, by layer name
            rows = np.ascontiguousarray(features, dtype=self._dtype)
        if self._dtype == np.float16 and np.isinf(rows).any() and (np.isinf(rows) & np.isfinite(features)).any():
            raise CacheError(
                f"layer {layer!r} has features beyond the float16 range (±{_FLOAT16_MAX:g}); cache it as float32"
            )
        return rows

    def _load_matching(self) -> tuple[dict | None, dict[str, int]]:
        """The manifest and per-file data offsets if the entry on disk is this one and intact, else None."""
        try:
            manifest = json.loads((self.directory / MANIFEST_NAME).read_text())
            expected = {
                "format": FORMAT_VERSION,
                "key": canonical_json(self.key),
                "n_samples": self.n_samples,
                "widths": self.widths,
                "storage_dtype": self.storage_dtype,
                "files": self.files,
            }
            found = {name: manifest[name] for name in expected}
            found["key"] = canonical_json(found["key"])
            completed = manifest["completed"]
            if found != expected or type(completed) is not int or not 0 <= completed <= self.n_samples:
                return None, {}
            if manifest["complete"] is not (completed == self.n_samples) or not isinstance(manifest["created"], str):
                return None, {}
            offsets = {layer: self._data_offset(layer) for layer in self.widths}
        except (OSError, ValueError, KeyError, TypeError):
            return None, {}
        return manifest, offsets

    def _data_offset(self, layer: str) -> int:
        """Where the rows start in a layer's .npy, after checking its header and size (ValueError if off)."""
        path = self.directory / self.files[layer]
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
        if shape != (self.n_samples, self.widths[layer]) or fortran_order or dtype != self._dtype:
            raise ValueError(f"{path} holds {dtype} {shape}")
        if path.stat().st_size != offset + self.n_samples * self.widths[layer] * self._dtype.itemsize:
            raise ValueError(f"{path} is truncated")
        return offset

    def _create(self) -> None:
        """Start afresh: drop the manifest first (a crash from here on leaves a fresh entry), then every file
        but the lock, then preallocate the layer files and write a manifest with nothing completed."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / MANIFEST_NAME).unlink()
        for path in self.directory.iterdir():
            if path.name != LOCK_NAME and path.is_file():
                path.unlink()  # unlinked, never truncated: readers that mapped the old files keep them intact
        self._offsets = {}
        for layer, width in self.widths.items():
            path = self.directory / self.files[layer]
            array = np.lib.format.open_memmap(path, mode="w+", dtype=self._dtype, shape=(self.n_samples, width))
            self._offsets[layer] = array.offset
            del array
            _preallocate(path, self._offsets[layer] + self.n_samples * width * self._dtype.itemsize)
        self._created = _now()
        self._completed = 0
        self._write_manifest(0)

    def _write_manifest(self, completed: int) -> None:
        manifest = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "n_samples": self.n_samples,
            "widths": self.widths,
            "storage_dtype": self.storage_dtype,
            "files": self.files,
            "completed": completed,
            "complete": completed == self.n_samples,
            "created": self._created,
            "updated": _now(),
        }
        _write_json_atomic(self.directory / MANIFEST_NAME, manifest)


def _acquire_lock(directory: Path, wait_seconds: float, on_wait: Callable[[str], None] | None) -> int:
    """An fd holding an exclusive flock on the entry's lock file; the kernel drops it if the process dies."""
    try:
        import fcntl  # POSIX only
    except ImportError:
        raise CacheError("the feature cache needs file locks (Linux, macOS); pass --no-cache on this system") from None
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait_seconds
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(fd)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CacheError(
                        f"feature cache {directory} is in use by another probe run{holder}; wait for it to finish, "
                        "or pass another --cache-dir"
                    ) from None
                if on_wait is not None and not waited:
                    on_wait(f"feature cache {directory} is in use by another probe run{holder}; waiting for it")
                waited = True
                time.sleep(min(_POLL_SECONDS, remaining))
            except OSError as error:  # e.g. ENOLCK: a network file system without locks
                raise CacheError(
                    f"cannot lock feature cache {directory} ({error.strerror}); pass a local --cache-dir"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_holder(fd: int) -> str:
    """' (pid N on HOST)' as the holder recorded it, or '' if it has not (yet)."""
    try:
        pid, host = os.pread(fd, 256, 0).decode().split()
        return f" (pid {int(pid)} on {host})"
    except (OSError, ValueError):
        return ""


def _release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # so no one names a pid that no longer holds it
    os.close(fd)  # closing the only fd on the open file drops the flock


def _write_at(path: Path, position: int, rows: np.ndarray) -> None:
    """Write ``rows`` at byte ``position`` of an existing file and sync it to disk before returning."""
    view = memoryview(rows).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        while view:
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
        _sync(fd)
    finally:
        os.close(fd)


def _preallocate(path: Path, size: int) -> None:
    """Reserve the file's blocks now, so a full disk fails here, before any forward pass, not mid-run."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if hasattr(os, "posix_fallocate") and size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise CacheError(
                        f"not enough disk space for the feature cache in {path.parent} ({size / 1e6:.1f} MB per "
                        "layer file); free some, or pass another --cache-dir"
                    ) from error
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        _sync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write temp file, fsync, rename over ``path``, fsync the directory: readers see the old or the new file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    with contextlib.suppress(OSError):  # some platforms cannot open or sync a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _sync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
