"""Batches of model inputs, the next ones loaded while the model runs on this one.

An image folder decodes each batch on its own threads (``images.ImageFolder``); loading it on a background
thread, a batch ahead, lets that decoding overlap the forward pass, so a GPU waits only when decoding a batch
takes longer than running it. Arrays already in memory are sliced as they are: there is nothing to overlap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

AHEAD = 1  # batches loaded in advance: one is enough to overlap, and each costs a batch of float32 images


def batches(x, step: int, ahead: int = AHEAD) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, x[start:start + step] as an array)`` for consecutive batches of ``x``; lazy inputs (anything
    but an ndarray) ``ahead`` batches in advance on a background thread. Loading errors are raised here, at
    the batch they belong to; leaving early drops the batches loaded in advance."""
    starts = range(0, len(x), step)
    if isinstance(x, np.ndarray) or ahead < 1:
        for start in starts:
            yield start, _load(x, start, step)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="probecore-prefetch") as loader:
        pending = deque()
        try:
            for start in starts:
                pending.append((start, loader.submit(_load, x, start, step)))
                if len(pending) > ahead:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _load(x, start: int, step: int) -> np.ndarray:
    return np.asarray(x[start : start + step])
