"""The PyTorch adapter on a model fed (N, H, W, C) images that it permutes itself: the input is pooled as
channels-last, so pooling never mixes colours."""

import numpy as np
import torch

import probecore
from probecore.backends import torch as probe_torch


class ChannelsLastNet(torch.nn.Module):
    """Takes images as (N, H, W, C), as they come from an image library, and permutes them for its convolutions."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))

    def forward(self, images):
        return self.head(self.relu(self.conv(images.permute(0, 3, 1, 2))))


def test_a_torch_model_fed_nhwc_has_its_input_pooled_channels_last(rng):
    torch.manual_seed(4)
    n, side = 240, 96
    labels = np.arange(n) % 3  # which colour channel is brightest
    colours = rng.uniform(0.0, 0.6, size=(n, 3))
    colours[np.arange(n), labels] = colours.max(1) + 0.3  # brightest by a clear margin
    images = (colours[:, None, None, :] + rng.normal(scale=0.1, size=(n, side, side, 3))).astype(np.float32)
    policy = probecore.ReductionPolicy(max_features=768)  # 96 x 96 x 3 = 27 648 input features: pooled
    with torch.no_grad():  # the example is (N, H, W, C), and torch's own output takes it so
        assert ChannelsLastNet()(torch.from_numpy(images[:2])).shape == (2, 3)
    report = probe_torch.probe_module(ChannelsLastNet(), images, labels, probecore.RunSpec(policy=policy))
    by_name = {layer.name: layer for layer in report.layers}
    pooled = by_name["images"]
    assert pooled.reduction["features_in"] == side * side * 3 and pooled.n_features <= 768
    # Read as (C, H, W), the last axis (the colours) would be pooled away with the width.
    assert pooled.metrics["test"].error < 0.05  # the probe reads the colours
    assert pooled.reduction["layout"] == "channels_last"
