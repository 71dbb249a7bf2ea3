"""The feature cache inside the pipeline: hits run no forward pass, kill -9 resumes, concurrent runs agree."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.bundled import DEMO_DATA, DEMO_MODEL

LAYERS = ["relu1", "pool2", "relu3"]


@pytest.fixture(scope="module")
def dataset():
    return probecore.load_dataset(DEMO_DATA)


def extract(dataset, cache_dir, cache_dtype="float32", **source_options):
    source = OnnxSource(DEMO_MODEL, device="cpu", **source_options)
    chosen = probecore.select_layers(source.layers(), LAYERS)
    spec = probecore.RunSpec(batch_size=500, cache_dir=cache_dir, cache_dtype=cache_dtype)
    return source, probecore.extract_features(source, dataset, chosen, spec)


def assert_same_features(first, second):
    for layer, by_split in first.by_layer.items():
        for split, values in by_split.items():
            np.testing.assert_array_equal(np.asarray(values), np.asarray(second.by_layer[layer][split]))
    np.testing.assert_array_equal(first.model_test_scores, second.model_test_scores)


def test_a_cache_hit_runs_no_forward_pass(tmp_path, dataset):
    _, first = extract(dataset, tmp_path)
    source, second = extract(dataset, tmp_path)
    assert first.splits_from_cache == 0 and second.splits_from_cache == 3
    assert source.bytes_fetched == 0 and source._session is None
    assert_same_features(first, second)
    _, uncached = extract(dataset, None)
    assert_same_features(first, uncached)


def test_other_reductions_or_data_make_other_entries(tmp_path, dataset):
    extract(dataset, tmp_path)
    source = OnnxSource(DEMO_MODEL, device="cpu")
    chosen = probecore.select_layers(source.layers(), LAYERS)
    policy = probecore.ReductionPolicy(pool="max")
    other = probecore.extract_features(source, dataset, chosen, probecore.RunSpec(policy=policy, batch_size=500, cache_dir=tmp_path))
    assert other.splits_from_cache == 0 and source.bytes_fetched > 0
    assert len(list(tmp_path.iterdir())) == 6


def test_float16_storage_halves_the_files_and_keeps_probe_error(tmp_path, dataset):
    _, full = extract(dataset, tmp_path / "f32")
    _, half = extract(dataset, tmp_path / "f16", "float16")
    sizes = {name: sum(f.stat().st_size for f in (tmp_path / name).rglob("*.npy")) for name in ("f32", "f16")}
    assert sizes["f16"] < 0.52 * sizes["f32"]
    for layer in LAYERS:
        errors = []
        for features in (full, half):
            by_split = features.by_layer[layer]
            probe = probecore.fit_probe(by_split["train"], dataset.train.y, 10, by_split["valid"], dataset.valid.y)
            errors.append(probe.evaluate(by_split["test"], dataset.test.y).error)
        assert abs(errors[0] - errors[1]) <= 0.005, (layer, errors)


WORKER = textwrap.dedent(
    """
    import sys, time
    import probecore
    from probecore.backends.onnx_source import OnnxSource
    from probecore.bundled import DEMO_DATA, DEMO_MODEL

    dataset = probecore.load_dataset(DEMO_DATA)
    source = OnnxSource(DEMO_MODEL, device="cpu")
    chosen = probecore.select_layers(source.layers(), {layers!r})
    delay = float(sys.argv[2])
    progress = lambda *args: time.sleep(delay)
    spec = probecore.RunSpec(batch_size=100, cache_dir=sys.argv[1])
    probecore.extract_features(source, dataset, chosen, spec, progress)
    """
).format(layers=LAYERS)


def start_worker(tmp_path, cache_dir, delay):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(cache_dir), str(delay)], stderr=subprocess.PIPE)


def recorded_rows(cache_dir) -> int:
    total = 0
    for manifest in cache_dir.glob("*/manifest.json"):
        try:
            total += json.loads(manifest.read_text())["completed"]
        except (ValueError, KeyError):
            pass
    return total


def test_kill_9_mid_extraction_then_rerun_gives_identical_features(tmp_path, dataset):
    cache_dir = tmp_path / "cache"
    worker = start_worker(tmp_path, cache_dir, delay=0.05)
    deadline = time.monotonic() + 60
    while recorded_rows(cache_dir) < 300 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    interrupted_at = recorded_rows(cache_dir)
    assert 300 <= interrupted_at < len(dataset.train) + len(dataset.valid) + len(dataset.test)
    source, resumed = extract(dataset, cache_dir)
    assert resumed.splits_from_cache < 3  # the interrupted split was finished, not read whole
    _, uninterrupted = extract(dataset, tmp_path / "fresh")
    assert_same_features(resumed, uninterrupted)


def test_two_runs_on_one_cache_both_succeed_and_agree(tmp_path, dataset):
    cache_dir = tmp_path / "cache"
    workers = [start_worker(tmp_path, cache_dir, delay=0.0) for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stderr.read().decode()
    _, cached = extract(dataset, cache_dir)
    assert cached.splits_from_cache == 3
    _, fresh = extract(dataset, None)
    assert_same_features(cached, fresh)


class WideSource(probecore.ArraySource):
    """Makes 8192-wide activations per batch on the fly; cacheable, as a model source would be."""

    def __init__(self, n_samples, rng):
        super().__init__({"wide": np.zeros((n_samples, 1), np.float32)})
        self.rng = rng

    def layers(self):
        return [probecore.LayerInfo("wide", "Array", (8192,))]

    def activations(self, x, layer_names, batch_size):
        for start in range(0, len(x), batch_size):
            yield {"wide": self.rng.normal(size=(len(x[start : start + batch_size]), 8192)).astype(np.float32)}

    def identity(self):
        return {"source": "wide"}


def extraction_peak_bytes(tmp_path, rng, n_samples) -> int:
    source = WideSource(n_samples, rng)
    data = probecore.split_dataset(np.arange(n_samples), rng.integers(0, 4, n_samples), seed=0)
    spec = probecore.RunSpec(policy=probecore.ReductionPolicy(max_features=1024), batch_size=100, cache_dir=tmp_path / str(n_samples))
    tracemalloc.start()
    features = probecore.extract_features(source, data, source.layers(), spec)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert features.by_layer["wide"]["train"].shape == (len(data.train), 1024)
    return peak


def test_peak_memory_during_extraction_is_flat_in_the_number_of_samples(tmp_path, rng):
    extraction_peak_bytes(tmp_path, rng, 200)  # compile the kernels first: numba allocates while it does
    small, large = (extraction_peak_bytes(tmp_path, rng, n) for n in (1000, 10000))
    # The 10k run's reduced features alone are 41 MB; held in memory they would dwarf one batch (3.3 MB).
    assert large < 1.3 * small and large < 20e6, f"peak {small / 1e6:.1f} MB for 1k, {large / 1e6:.1f} MB for 10k"


def test_layers_in_groups_give_the_same_features_with_one_pass_per_group(tmp_path, dataset):
    _, together = extract(dataset, None)
    source = OnnxSource(DEMO_MODEL, device="cpu")
    chosen = probecore.select_layers(source.layers(), LAYERS)
    spec = probecore.RunSpec(batch_size=500, cache_dir=tmp_path, layers_per_pass=2)
    grouped = probecore.extract_features(source, dataset, chosen, spec)
    assert_same_features(grouped, together)
    assert len(list(tmp_path.iterdir())) == 6  # 2 groups x 3 splits
    with pytest.raises(probecore.ReductionError, match="layers_per_pass must be at least 1"):
        probecore.RunSpec(layers_per_pass=0)
