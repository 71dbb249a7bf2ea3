"""Reproduce the paper's pathological network (section 5.1, Figure 6): 128 fully connected layers of 128 units
with a skip connection from the input to the middle, trained briefly. Training reaches the labels through the
skip connection and leaves the first half unused: its probes do not improve with depth, and probecore's
report flags that dead segment.

    pip install torch==2.13.0 -e '.[torch]'
    python examples/pathological_mlp.py --out docs/pathological_mlp

Data: the 5 000 real MNIST digits bundled with probecore. Probed: the default layers (the input, all 128
hidden layers after their activation, the Add where the skip joins, the logits), at initialization and after 500 and 2 000 minibatches (Adam, learning rate 1e-4; He
initialization keeps the activations' scale through the depth), as in the paper's Figure 6.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import probecore
from bundled_digits import bundled_digits
from probecore.backends import torch as probe_torch
from probecore.render import sweep_figures

DEPTH, WIDTH, SKIP_TO = 128, 128, 64


class Layer(nn.Module):
    """One hidden layer: linear then leaky ReLU (the probe reads its output, the block's name)."""

    def __init__(self, width_in: int, width: int = WIDTH):
        super().__init__()
        self.linear = nn.Linear(width_in, width)
        self.activation = nn.LeakyReLU(0.01)
        nn.init.kaiming_normal_(self.linear.weight, a=0.01, nonlinearity="leaky_relu")  # keeps the scale with depth
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.activation(self.linear(x))


class PathologicalMLP(nn.Module):
    """x -> layer 0 -> ... -> layer 127 -> logits, where layer 64 also receives the input (the skip)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(784 if i == 0 else WIDTH) for i in range(DEPTH)])
        self.skip = nn.Linear(784, WIDTH)
        self.logits = nn.Linear(WIDTH, 10)

    def forward(self, pixels):
        x = pixels.flatten(1)
        h = x
        for index, layer in enumerate(self.layers):
            h = layer(h) if index != SKIP_TO else layer(h + self.skip(x))
        return self.logits(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[500, 2000], help="probe after these many minibatches of 64")
    parser.add_argument("--out", type=Path, default=Path("pathological-mlp"))
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset, x_train, y_train = bundled_digits()
    fit = probecore.FitOptions(l2=(1e-2, 1e-3, 1e-4))
    tracker = probecore.ProbeTracker(dataset, probecore.RunSpec(fit=fit))  # the default layers: the input, every block, the skip's Add
    model, example = PathologicalMLP(), x_train[:2]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    started = time.perf_counter()
    probe_torch.record(tracker, "init", model, example, ["pixels"])
    generator = torch.Generator().manual_seed(0)
    for step in range(1, max(args.steps) + 1):
        model.train()
        rows = torch.randint(len(x_train), (64,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train[rows]), y_train[rows]).backward()
        optimizer.step()
        if step in args.steps:  # the paper's Figure 6 shows 500 and 2000 minibatches
            trained = probe_torch.record(tracker, f"{step} steps", model, example, ["pixels"])
    sweep = tracker.sweep
    sweep.write(args.out, sweep_figures(sweep))
    grid = 100 * sweep.grid()
    print(f"model's own test error: {', '.join(f'{c} {100 * r.model_test.error:.1f}%' for c, r in zip(sweep.checkpoints, sweep.reports))}")
    print(f"{'test error %':<12}" + "".join(f"{c:>12}" for c in sweep.checkpoints))
    shown = {0, 1, 2, 9, 17, 33, 49, 62, 63, 64, 65, 81, 97, 113, 127}
    for index, name in enumerate(sweep.layers):
        if not name.startswith("layers.") or int(name.split(".")[1]) in shown:
            print(f"{name:<12}" + "".join(f"{v:12.1f}" for v in grid[index]))
    for finding in trained.diagnostics:
        print(f"note ({finding.kind}): {finding.message}")
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
