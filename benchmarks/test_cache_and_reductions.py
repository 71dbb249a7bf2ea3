"""The feature cache and the host reductions, each against a baseline in the same run.

- ``test_cache_rerun_vs_first_run``: the extraction phase of the bundled demo (all default layers, 5000
  digits) read back from a complete feature cache, against the first run of the same job into an empty cache
  (a fresh directory every round). Target from the issue: the rerun at least 50x faster.
- ``test_host_reduction_vs_numpy_and_copy``: ``Reduction.apply`` (the numba kernels) on one batch of a
  ResNet-50-sized feature map, against the numpy reference of the same reduction and against a plain copy of
  the same bytes (the floor any reduction that reads every byte is measured against).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import probecore
from probecore import bundled
from probecore.backends.onnx_source import OnnxSource


@pytest.mark.benchmark(group="cache")
def test_cache_rerun_vs_first_run(mnist, paired, record, tmp_path):
    source = OnnxSource(bundled.DEMO_MODEL, device="cpu")
    chosen = probecore.select_layers(source.layers(), None)
    probecore.extract_features(source, mnist, chosen)  # build the session, compile the kernels: not timed
    warm = probecore.RunSpec(cache_dir=tmp_path / "warm")
    probecore.extract_features(source, mnist, chosen, warm)
    rounds = iter(range(1000))

    def first_run():
        cache_dir = tmp_path / f"cold-{next(rounds)}"
        result = probecore.extract_features(source, mnist, chosen, probecore.RunSpec(cache_dir=cache_dir))
        shutil.rmtree(cache_dir)
        return result

    def rerun():
        return probecore.extract_features(source, mnist, chosen, warm)

    timed = paired(rerun, first_run, 5)
    assert timed.candidate_result.splits_from_cache == 3 and timed.baseline_result.splits_from_cache == 0
    for layer, by_split in timed.candidate_result.by_layer.items():
        np.testing.assert_array_equal(np.asarray(by_split["test"]), np.asarray(timed.baseline_result.by_layer[layer]["test"]))
    record(
        {
            "first_run_s": round(timed.baseline_min, 4),
            "rerun_s": round(timed.candidate_min, 4),
            "speedup": round(timed.baseline_min / timed.candidate_min, 1),
            **{f"timing_{key}": value for key, value in timed.figures().items()},
        }
    )


REDUCTION_CASES = {  # name: (batch shape, policy)
    "layer1-avgpool-global": ((16, 256, 56, 56), dict(global_pool=True)),
    "layer1-avgpool-window": ((16, 256, 56, 56), dict()),
    "layer1-maxpool-global": ((16, 256, 56, 56), dict(global_pool=True, pool="max")),
    "flat-subset": ((16, 65536), dict()),
}


def numpy_reduction(batch: np.ndarray, reduction: probecore.Reduction) -> np.ndarray:
    """The same reduction in plain numpy: tile reshape-reduce (padding edge tiles with NaN), then the subset."""
    n = len(batch)
    if reduction.pool is not None:
        window = reduction.window
        channels, height, width = batch.shape[1:]
        padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
        padded = np.full((n, channels, padded_h, padded_w), np.nan, np.float32)
        padded[:, :, :height, :width] = batch
        tiles = padded.reshape(n, channels, padded_h // window, window, padded_w // window, window)
        batch = (np.nanmax if reduction.pool == "max" else np.nanmean)(tiles, axis=(3, 5))
    flat = batch.reshape(n, -1)
    return flat[:, reduction.subset] if reduction.subset is not None else flat


@pytest.mark.benchmark(group="host-reduction")
@pytest.mark.parametrize("case", list(REDUCTION_CASES))
@pytest.mark.parametrize("baseline", ["numpy", "copy"])
def test_host_reduction_vs_numpy_and_copy(case, baseline, paired, record, rng_seed=0):
    shape, policy = REDUCTION_CASES[case]
    batch = np.random.default_rng(rng_seed).normal(size=shape).astype(np.float32)
    reduction = probecore.plan_reduction(case, shape[1:], probecore.ReductionPolicy(**policy))
    reduction.apply(batch[:1])  # compile outside the timing
    reference = (lambda: numpy_reduction(batch, reduction)) if baseline == "numpy" else batch.copy
    timed = paired(lambda: reduction.apply(batch), reference, 10)
    if baseline == "numpy":
        np.testing.assert_allclose(timed.candidate_result, timed.baseline_result, rtol=1e-5, atol=1e-5)
    record(
        {
            "reduction": reduction.describe(),
            "megabytes": round(batch.nbytes / 1e6, 1),
            f"{baseline}_ms": round(1000 * timed.baseline_min, 2),
            "probecore_ms": round(1000 * timed.candidate_min, 2),
            f"ratio_probecore_over_{baseline}": round(timed.candidate_min / timed.baseline_min, 3),
        }
    )
