"""The feature cache: exact round trips, resume after interruption or kill -9, one writer at a time, and
nothing half-written ever read back."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from probecore import feature_cache
from probecore.errors import ProbeError
from probecore.feature_cache import MANIFEST_NAME, CacheError, FeatureCache

# Layer names as ONNX spells them: slashes, colons, spaces.
WIDTHS = {"/conv1/Relu_output_0": 7, "block 2:out": 3, "head": 1}
KEY = {"model": "sha256:abc", "layers": {"head": {"pool": None}}, "split": "train", "data": "f00d"}

WORKER = r"""
import json, sys, time
import numpy as np
from probecore.feature_cache import FeatureCache

args = json.loads(sys.argv[1])
data = dict(np.load(args["data"]))
n = len(next(iter(data.values())))
print("ready", flush=True)
while args.get("go") and not __import__("os").path.exists(args["go"]):
    time.sleep(0.01)
cache = FeatureCache(args["root"])
widths = {name: array.shape[1] for name, array in data.items()}
say = lambda message: print("waiting", flush=True)
with cache.open(args["key"], n, widths, wait_seconds=args["wait"], on_wait=say) as entry:
    if args.get("hold"):
        print("locked", flush=True)
        time.sleep(60)
    if entry.complete:
        print("complete", flush=True)
    else:
        print("wrote", flush=True)
        while entry.completed < n:
            start = entry.completed
            entry.write(start, {name: a[start:start + args["batch"]] for name, a in data.items()})
            time.sleep(args["sleep"])
    features = entry.read()
    assert all(np.array_equal(features[name], a) for name, a in data.items())
print("ok", flush=True)
"""


def features(rng, n, widths=WIDTHS):
    return {name: rng.standard_normal((n, width)).astype(np.float32) for name, width in widths.items()}


def write_all(entry, data, batches):
    """Write ``data`` from ``entry.completed`` on, in batches of the given sizes (the last one takes the rest)."""
    for size in batches:
        start = entry.completed
        entry.write(start, {name: array[start : start + size] for name, array in data.items()})
    start = entry.completed
    entry.write(start, {name: array[start:] for name, array in data.items()})


def manifest(entry_dir):
    return json.loads((entry_dir / MANIFEST_NAME).read_text())


def assert_same(read, data, dtype=np.float32):
    assert set(read) == set(data)
    for name, array in data.items():
        assert read[name].dtype == dtype
        np.testing.assert_array_equal(read[name], array.astype(dtype))


def start_worker(tmp_path, data_path, **args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    defaults = {"root": str(tmp_path / "cache"), "data": str(data_path), "key": KEY, "wait": 30, "batch": 4}
    args = {**defaults, "sleep": 0.0, **args}
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def saved(tmp_path, data):
    path = tmp_path / "data.npz"
    np.savez(path, **data)
    return path


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_round_trip_in_uneven_batches_is_exact(tmp_path, rng):
    data = features(rng, 37)
    cache = FeatureCache(tmp_path)
    with cache.open(KEY, 37, WIDTHS) as entry:
        assert (entry.completed, entry.complete) == (0, False)
        write_all(entry, data, [10, 1, 13])
        assert (entry.completed, entry.complete) == (37, True)
        read = entry.read()
        assert_same(read, data)
        assert all(isinstance(array, np.memmap) and not array.flags.writeable for array in read.values())
        assert entry.size_bytes >= sum(array.nbytes for array in data.values())
    state = manifest(entry.directory)
    assert state["complete"] and state["completed"] == 37 and state["key"] == KEY and state["widths"] == WIDTHS
    # layer names never become paths: every file lies directly in the entry directory
    assert sorted(p.name for p in entry.directory.iterdir() if p.suffix == ".npy") == sorted(state["files"].values())
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != entry.directory] == []


def test_float16_storage_rounds_like_numpy_and_halves_the_files(tmp_path, rng):
    data = features(rng, 50, {"a": 64, "b/c": 9})
    widths = {"a": 64, "b/c": 9}
    entries = {}
    for dtype in ("float32", "float16"):
        with FeatureCache(tmp_path, dtype).open(KEY, 50, widths) as entry:
            write_all(entry, data, [17, 17])
            read = entry.read()
            entries[dtype] = (entry.directory, read)
    (dir32, read32), (dir16, read16) = entries["float32"], entries["float16"]
    assert dir32 != dir16
    assert_same(read32, data)
    assert_same(read16, data, np.float16)
    for name in data:
        np.testing.assert_allclose(read16[name].astype(np.float32), data[name], rtol=2**-11, atol=2**-24)
        assert read16[name].nbytes * 2 == read32[name].nbytes
        bytes16 = (dir16 / feature_cache.layer_file_name(name)).stat().st_size - read16[name].offset
        bytes32 = (dir32 / feature_cache.layer_file_name(name)).stat().st_size - read32[name].offset
        assert bytes16 * 2 == bytes32 == data[name].nbytes


def test_float16_refuses_values_it_would_turn_into_inf(tmp_path):
    with FeatureCache(tmp_path, "float16").open(KEY, 2, {"a": 2}) as entry:
        with pytest.raises(CacheError, match="float16 range"):
            entry.write(0, {"a": np.array([[1.0, 7e4], [0.0, 0.0]], np.float32)})
        assert entry.completed == 0
        entry.write(0, {"a": np.array([[np.inf, 6e4], [np.nan, 0.0]], np.float32)})  # inf/nan in, inf/nan out
        assert entry.complete


def test_same_key_reuses_the_complete_entry_without_writing(tmp_path, rng, monkeypatch):
    data = features(rng, 20)
    cache = FeatureCache(tmp_path)
    with cache.open(KEY, 20, WIDTHS) as entry:
        write_all(entry, data, [8])
    first_dir = entry.directory
    with cache.open({**KEY, "split": "valid"}, 20, WIDTHS) as other:
        assert other.directory != first_dir and other.completed == 0

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first_dir.iterdir() if p.name != "lock"}

    def no_writes(*args, **kwargs):
        raise AssertionError("a complete entry was written to")

    for name in ("_write_at", "_write_json_atomic", "_preallocate"):
        monkeypatch.setattr(feature_cache, name, no_writes)
    reordered = dict(reversed(list(KEY.items())))  # same key, other dict order
    with cache.open(reordered, 20, WIDTHS) as again:
        assert again.directory == first_dir
        assert (again.completed, again.complete) == (20, True)
        assert_same(again.read(), data)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first_dir.iterdir() if p.name != "lock"}
    assert after == before


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, rng):
    data = features(rng, 45)
    with FeatureCache(tmp_path / "whole").open(KEY, 45, WIDTHS) as entry:
        write_all(entry, data, [6, 6, 6])
        whole = entry.read()

    cache = FeatureCache(tmp_path / "parts")
    with cache.open(KEY, 45, WIDTHS) as entry:
        for start in (0, 6, 12):
            entry.write(start, {name: array[start : start + 6] for name, array in data.items()})
    # interrupted: closed at 18 of 45
    with cache.open(KEY, 45, WIDTHS) as entry:
        assert (entry.completed, entry.complete) == (18, False)
        assert manifest(entry.directory)["completed"] == 18
        write_all(entry, data, [11])
        assert_same(entry.read(), {name: np.asarray(array) for name, array in whole.items()})


def test_kill_9_mid_write_resumes_from_the_recorded_count(tmp_path, rng):
    data = features(rng, 40)
    worker = start_worker(tmp_path, saved(tmp_path, data), batch=4, sleep=0.2)
    entry_dir = FeatureCache(tmp_path / "cache").entry_dir(KEY)

    def progressed():
        assert worker.poll() is None, worker.stderr.read()
        try:
            return manifest(entry_dir)["completed"] >= 8
        except (OSError, ValueError):
            return False

    wait_for(progressed)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL
    recorded = manifest(entry_dir)["completed"]
    assert 8 <= recorded < 40 and recorded % 4 == 0

    with FeatureCache(tmp_path / "cache").open(KEY, 40, WIDTHS, wait_seconds=5) as entry:
        assert entry.completed == recorded
        write_all(entry, data, [5, 5])
        assert_same(entry.read(), data)


def test_two_runs_on_one_key_take_turns_and_agree(tmp_path, rng):
    data = features(rng, 40)
    data_path = saved(tmp_path, data)
    go = tmp_path / "go"
    workers = [start_worker(tmp_path, data_path, batch=4, sleep=0.1, go=str(go)) for _ in range(2)]
    for worker in workers:
        assert worker.stdout.readline() == "ready\n"
    go.touch()  # both open the entry at the same moment; the writer holds it for about a second
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        outputs.append(out.split())
    assert sorted(outputs) == [["waiting", "complete", "ok"], ["wrote", "ok"]]
    with FeatureCache(tmp_path / "cache").open(KEY, 40, WIDTHS) as entry:
        assert entry.complete
        assert_same(entry.read(), data)


def test_a_busy_entry_raises_naming_the_directory_and_holder_until_it_dies(tmp_path, rng):
    data = features(rng, 12)
    holder = start_worker(tmp_path, saved(tmp_path, data), hold=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        assert holder.stdout.readline() == "locked\n"
        cache = FeatureCache(tmp_path / "cache")
        started = time.monotonic()
        with pytest.raises(CacheError) as caught:
            cache.open(KEY, 12, WIDTHS, wait_seconds=0.3)
        assert 0.3 <= time.monotonic() - started < 5
        message = str(caught.value)
        assert isinstance(caught.value, ProbeError) and "\n" not in message
        assert str(cache.entry_dir(KEY)) in message and f"pid {holder.pid}" in message and "--cache-dir" in message
    finally:
        holder.kill()
        holder.wait()
    with cache.open(KEY, 12, WIDTHS, wait_seconds=5) as entry:  # the kernel dropped the dead holder's lock
        assert entry.completed == 0


def test_a_second_open_in_the_same_process_waits_too(tmp_path):
    cache = FeatureCache(tmp_path)
    with cache.open(KEY, 3, {"a": 1}):
        with pytest.raises(CacheError, match=f"pid {os.getpid()}"):
            cache.open(KEY, 3, {"a": 1}, wait_seconds=0)
    with cache.open(KEY, 3, {"a": 1}, wait_seconds=0) as entry:
        assert entry.completed == 0


@pytest.mark.parametrize("damage", ["truncated manifest", "missing manifest", "missing layer file", "short layer file"])
def test_a_damaged_entry_starts_afresh(tmp_path, rng, damage):
    data = features(rng, 16)
    cache = FeatureCache(tmp_path)
    with cache.open(KEY, 16, WIDTHS) as entry:
        write_all(entry, data, [8])
    manifest_path = entry.directory / MANIFEST_NAME
    layer_path = entry.directory / feature_cache.layer_file_name("head")
    if damage == "truncated manifest":
        manifest_path.write_text(manifest_path.read_text()[:40])
    elif damage == "missing manifest":
        manifest_path.unlink()
    elif damage == "missing layer file":
        layer_path.unlink()
    else:
        layer_path.write_bytes(layer_path.read_bytes()[:-4])
    with cache.open(KEY, 16, WIDTHS) as entry:
        assert (entry.completed, entry.complete) == (0, False)
        assert manifest(entry.directory)["completed"] == 0
        with pytest.raises(ValueError, match="0 of 16"):
            entry.read()
        fresh = features(rng, 16)
        write_all(entry, fresh, [3])
        assert_same(entry.read(), fresh)


@pytest.mark.parametrize("change", ["widths", "layers", "n_samples"])
def test_an_entry_of_other_shape_is_restarted(tmp_path, rng, change):
    cache = FeatureCache(tmp_path)
    with cache.open(KEY, 16, WIDTHS) as entry:
        write_all(entry, features(rng, 16), [8])
    widths, n = dict(WIDTHS), 16
    if change == "widths":
        widths["head"] = 5
    elif change == "layers":
        del widths["head"]
        widths["other"] = 2
    else:
        n = 17
    with cache.open(KEY, n, widths) as entry:
        assert entry.completed == 0
        data = features(rng, n, widths)
        write_all(entry, data, [4])
        assert_same(entry.read(), data)
        names = {p.name for p in entry.directory.iterdir()}
    assert names == {"lock", MANIFEST_NAME, *(feature_cache.layer_file_name(layer) for layer in widths)}


def test_misuse_raises(tmp_path, rng):
    data = features(rng, 10)
    with FeatureCache(tmp_path).open(KEY, 10, WIDTHS) as entry:
        with pytest.raises(ValueError, match="0 of 10"):
            entry.read()
        with pytest.raises(ValueError, match="expected start=0, got 2"):
            entry.write(2, {name: array[2:4] for name, array in data.items()})
        entry.write(0, {name: array[:4] for name, array in data.items()})
        with pytest.raises(ValueError, match="expected start=4, got 0"):
            entry.write(0, {name: array[:4] for name, array in data.items()})
        with pytest.raises(ValueError, match="missing \\['head'\\]"):
            entry.write(4, {name: array[4:6] for name, array in data.items() if name != "head"})
        with pytest.raises(ValueError, match="same number of rows"):
            entry.write(4, {name: array[4 : 6 + (name == "head")] for name, array in data.items()})
        with pytest.raises(ValueError, match="expected \\(n, 3\\)"):
            entry.write(4, {**{name: array[4:6] for name, array in data.items()}, "block 2:out": data["head"][4:6]})
        with pytest.raises(ValueError, match="do not fit"):
            entry.write(4, {name: np.concatenate([array, array])[4:] for name, array in data.items()})
        assert entry.completed == 4
    with pytest.raises(ValueError, match="closed"):
        entry.read()
    with pytest.raises(CacheError, match="float64"):
        FeatureCache(tmp_path, "float64")


def test_an_entry_of_no_samples_is_complete_at_once(tmp_path):
    with FeatureCache(tmp_path).open(KEY, 0, {"a": 4, "b": 0}) as entry:
        assert entry.complete
        assert {name: a.shape for name, a in entry.read().items()} == {"a": (0, 4), "b": (0, 0)}


@pytest.mark.parametrize("failing", ["pwrite", "replace"])
def test_a_full_disk_propagates_and_leaves_the_entry_resumable(tmp_path, rng, monkeypatch, failing):
    """The 3rd batch fails part way (after the first layer's rows, or when replacing the manifest)."""
    data = features(rng, 30)
    garbage = features(rng, 30)
    cache = FeatureCache(tmp_path)
    real = getattr(os, failing)
    calls = []
    fail_at = {"pwrite": 2 * len(WIDTHS) + 2, "replace": 3}[failing]

    def full_disk(*args, **kwargs):
        calls.append(args)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    with cache.open(KEY, 30, WIDTHS) as entry:
        monkeypatch.setattr(os, failing, full_disk)
        for start in (0, 5):
            entry.write(start, {name: array[start : start + 5] for name, array in data.items()})
        with pytest.raises(OSError) as caught:
            entry.write(10, {name: array[10:15] for name, array in garbage.items()})
        monkeypatch.setattr(os, failing, real)
        assert caught.value.errno == errno.ENOSPC
        assert entry.completed == 10 and manifest(entry.directory)["completed"] == 10
        assert [p.name for p in entry.directory.iterdir() if p.name.endswith(".tmp")] == []
    with cache.open(KEY, 30, WIDTHS) as entry:
        assert entry.completed == 10
        write_all(entry, data, [7])  # overwrites the rows the failed batch left behind
        assert_same(entry.read(), data)


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_no_space_for_a_new_entry_fails_before_any_work(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cache = FeatureCache(tmp_path)
    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(CacheError, match="not enough disk space.*--cache-dir"):
        cache.open(KEY, 1000, WIDTHS)
    assert not (cache.entry_dir(KEY) / MANIFEST_NAME).exists()
    monkeypatch.undo()
    with cache.open(KEY, 1000, WIDTHS, wait_seconds=0) as entry:  # the lock was released, the entry is fresh
        assert entry.completed == 0
