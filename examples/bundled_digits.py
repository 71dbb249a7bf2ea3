"""The 5 000 MNIST digits bundled with probecore, pixels scaled to 0..1, for the paper reproductions."""

from __future__ import annotations

import numpy as np
import torch

import probecore
from probecore.bundled import DEMO_DATA


def bundled_digits() -> tuple[probecore.Dataset, torch.Tensor, torch.Tensor]:
    """The dataset (3 500 / 500 / 1 000) and its training images and labels as torch tensors, read once."""
    dataset = probecore.load_dataset(DEMO_DATA)
    for split in dataset.splits().values():
        split.x = split.x.astype(np.float32) / 255
    return dataset, torch.from_numpy(dataset.train.x), torch.from_numpy(dataset.train.y)
