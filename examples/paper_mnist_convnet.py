"""Reproduce the paper's MNIST convnet figures: probes at every op (Fig 2), at initialization and after
training (Fig 3), and across training as a layer x checkpoint heatmap (Fig 9).

    pip install torch==2.13.0 -e '.[torch]'
    python examples/paper_mnist_convnet.py --out docs/paper_mnist_convnet

The model is Figure 2's (TensorFlow's models/image/mnist/convolutional.py): conv 5x5 32, ReLU, max-pool,
conv 5x5 64, ReLU, max-pool, fully connected 512, ReLU, fully connected 10; every op is a named module, so
every op is probed. Data: the 5 000 real MNIST digits bundled with probecore (3 500 train, 500 valid, 1 000
test); the model trains on the same 3 500 training digits the probes are fitted on. A ``ProbeTracker``
records the probes at initialization and after each epoch, through ``probecore.backends.torch.record``.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import probecore
from bundled_digits import bundled_digits
from probecore.backends import torch as probe_torch
from probecore.render import sweep_figures


def paper_convnet() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 5, padding=2)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(64 * 7 * 7, 512)), ("relu3", nn.ReLU()),
        ("logits", nn.Linear(512, 10)),
    ]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("paper-mnist-convnet"))
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset, x_train, y_train = bundled_digits()
    layers = ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "output"]
    tracker = probecore.ProbeTracker(dataset, probecore.RunSpec(layers=[f"name:{name}" for name in layers]))
    model, example = paper_convnet(), x_train[:2]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    started = time.perf_counter()
    probe_torch.record(tracker, "init", model, example)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[rows]), y_train[rows]).backward()
            optimizer.step()
        report = probe_torch.record(tracker, f"epoch {epoch}", model, example)
        print(f"epoch {epoch}: model's own test error {100 * report.model_test.error:.1f}%", flush=True)
    sweep = tracker.sweep
    sweep.write(args.out, sweep_figures(sweep))
    print(f"{'layer':<8}" + "".join(f"{c:>10}" for c in sweep.checkpoints))
    for name, row in zip(sweep.layers, sweep.grid()):
        print(f"{name:<8}" + "".join(f"{100 * v:10.1f}" for v in row))
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/sweep.json, heatmap.png, report.html")


if __name__ == "__main__":
    main()
