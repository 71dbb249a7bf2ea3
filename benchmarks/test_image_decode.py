"""Feeding a model from an image folder (issue 16, point 3): decoding threads, and the next batch decoded while
the model runs on this one.

JPEGs written in the test (``gpu_check_fit.write_jpegs``: a colour and stripes per class under noise,
quality 90), into a temporary folder.

- ``test_decode_threads``: ``ImageFolder`` loading every image (decode, preprocess to float32 (3, 224, 224))
  with 2 decoding threads against 1, paired rounds; two kinds of file: 224 x 224 JPEGs cropped as they are
  (``resize=224``: decoding and normalizing only) and 500 x 375 ones resized to 256 and cropped (ImageNet's
  habit). Figures: images/s, images/s per thread, and the ratio (2 on two idle cores if the threads never
  wait on each other: Pillow releases the GIL while it decodes and resizes). Guard: the same arrays.
- ``test_prefetch_overlap``: ``prefetch.batches`` over the folder (batches of 32, 224-pixel JPEGs, 2
  decoding threads) feeding a stand-in for a GPU that takes as long as decoding a batch did when measured
  just before (a sleep: it holds no core), loaded one batch ahead against loaded when asked. Figures: wall
  time of both and the share of it the consumer spent waiting for inputs (0.5 when nothing overlaps, as
  low as the cores allow when decoding hides behind the "GPU"). Guard: the same batches.

With ``--benchmark-disable`` (CI smoke test) everything runs once on fewer images.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from gpu_check_fit import write_jpegs
from probecore import prefetch
from probecore.images import ImageFolder, ImagePreprocessing

FILES = {  # name: (JPEG size, preprocessing)
    "224px_no_resize": ((224, 224), ImagePreprocessing(size=224, resize=224)),
    "500x375_resize_256": ((500, 375), ImagePreprocessing(size=224)),
}
IMAGES = {"timed": 256, "quick": 32}
ROUNDS = {"timed": 5, "quick": 1}
BATCH = 32


def _mode(benchmark) -> str:
    return "quick" if benchmark.disabled else "timed"


@pytest.mark.benchmark(group="images")
@pytest.mark.parametrize("kind", list(FILES))
def test_decode_threads(kind, tmp_path, benchmark, paired, record):
    size, preprocessing = FILES[kind]
    root = write_jpegs(tmp_path / "jpegs", IMAGES[_mode(benchmark)], size)
    one, two = (ImageFolder(root, preprocessing, workers=workers) for workers in (1, 2))
    one[:BATCH], two[:BATCH]  # noqa: B018  (threads started, files in the page cache)
    measured = paired(lambda: two[:], lambda: one[:], ROUNDS[_mode(benchmark)])
    n = len(one)
    record(
        {
            "kind": kind,
            "images": n,
            "one_thread_images_per_s": round(n / measured.baseline_min, 1),
            "two_threads_images_per_s": round(n / measured.candidate_min, 1),
            "two_threads_images_per_s_per_thread": round(n / measured.candidate_min / 2, 1),
            "ratio_two_over_one": round(measured.baseline_min / measured.candidate_min, 3),
            **measured.figures(),
        }
    )
    np.testing.assert_array_equal(measured.candidate_result, measured.baseline_result)


def _fed(folder, ahead: int, infer_seconds: float) -> tuple[list, float, float]:
    """Batches, wall seconds and seconds spent waiting for them, with a stand-in for the model."""
    kept, waited = [], 0.0
    started = clock = time.perf_counter()
    for _, batch in prefetch.batches(folder, BATCH, ahead=ahead):
        waited += time.perf_counter() - clock
        kept.append(batch[:, 0, 0, 0].copy())
        time.sleep(infer_seconds)  # the GPU's forward pass: the host's cores stay free
        clock = time.perf_counter()
    return kept, time.perf_counter() - started, waited


@pytest.mark.benchmark(group="images")
def test_prefetch_overlap(tmp_path, benchmark, paired, record):
    size, preprocessing = FILES["224px_no_resize"]
    folder = ImageFolder(write_jpegs(tmp_path / "jpegs", IMAGES[_mode(benchmark)], size), preprocessing, workers=2)
    started = time.perf_counter()
    for start in range(0, len(folder), BATCH):
        folder[start : start + BATCH]
    infer_seconds = (time.perf_counter() - started) / -(-len(folder) // BATCH)  # as long as decoding a batch
    rounds = ROUNDS[_mode(benchmark)]
    measured = paired(lambda: _fed(folder, 1, infer_seconds), lambda: _fed(folder, 0, infer_seconds), rounds)
    batches_ahead, wall_ahead, wait_ahead = measured.candidate_result
    batches_asked, wall_asked, wait_asked = measured.baseline_result
    record(
        {
            "images": len(folder),
            "batch": BATCH,
            "stand_in_forward_ms_per_batch": round(1000 * infer_seconds, 1),
            "loaded_ahead_wall_s": round(wall_ahead, 3),
            "loaded_when_asked_wall_s": round(wall_asked, 3),
            "loaded_ahead_share_waiting": round(wait_ahead / wall_ahead, 3),
            "loaded_when_asked_share_waiting": round(wait_asked / wall_asked, 3),
            **measured.figures(),
        }
    )
    for got, expected in zip(batches_ahead, batches_asked):
        np.testing.assert_array_equal(got, expected)
