"""Control tasks (Hewitt & Liang, 2019): labels a probe can only get right by memorizing its inputs.

Each distinct input gets a fixed random class, drawn from the training labels' distribution; the same
input gets the same control label wherever it appears. A probe fitted on these labels with the same
settings as the real one shows how much a layer's probe could score without the layer encoding the task:
selectivity = control error - real error. Low selectivity means the probe's accuracy says more about the
probe's capacity to memorize than about the layer.

Inputs are identified by content: the bytes of each array row, or of each image file. Where no input
repeats across splits (most image data sets), the control probe's valid and test errors are chance
level; its train error then measures memorization.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .datasets import Dataset


def control_labels(dataset: Dataset, seed: int = 0) -> dict[str, np.ndarray]:
    """Each split's control labels (class indices), a function of the input's content and ``seed`` alone."""
    n_classes = len(dataset.classes)
    frequencies = np.bincount(dataset.train.y, minlength=n_classes) / len(dataset.train.y)
    bounds = np.cumsum(frequencies)[:-1]
    return {
        name: np.searchsorted(bounds, _uniforms(split.x, seed), side="right").astype(np.int64)
        for name, split in dataset.splits().items()
    }


def _uniforms(x, seed: int) -> np.ndarray:
    """One number in [0, 1) per sample from a keyed hash of its content: identical inputs, identical numbers."""
    key = seed.to_bytes(8, "little")
    if hasattr(x, "paths"):  # an image folder: the file's bytes, without decoding the image
        contents = (path.read_bytes() for path in x.paths)
    else:
        x = np.asarray(x)
        contents = (np.ascontiguousarray(row).tobytes() for row in x.reshape(len(x), -1))
    digests = [hashlib.blake2b(content, digest_size=8, key=key).digest() for content in contents]
    return np.array([int.from_bytes(digest, "little") for digest in digests], dtype=np.float64) / 2.0**64
