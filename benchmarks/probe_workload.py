"""Synthetic probing workload shaped like a ResNet-50 probed after global average pooling.

Sixteen "layers" named and sized like ResNet-50's bottleneck blocks after pooling (``layer1.0`` to
``layer4.2``: 3 x 256, 4 x 512, 6 x 1024, 3 x 2048 features), without downloading or running a model: the
features are the hidden layers of one random ReLU network (He-scaled Gaussian weights, no biases) applied
to clustered inputs. Each class is a union of a few Gaussian clusters in a 64-dimensional input space, with
enough noise that clusters of different classes overlap, so no layer is linearly trivial. As in a ResNet,
a layer that keeps its width is a residual block, ``relu(h + 0.5 * h @ W)``; a plain ReLU layer is used
only where the width changes. (A plain 16-layer ReLU chain loses class information too fast: probes on its
last layers reached 50 to 60 % test error.) Probe errors grow with depth, about 8 % to 25-32 %.

Layers are generated one at a time (``Workload.layers()`` is a generator), so the sixteen never sit in memory
together: generating a 2048-wide layer of 30 000 samples takes under 1 GB. Everything is deterministic from
``seed``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# (name, width) per bottleneck block of ResNet-50, in network order
RESNET50_BLOCKS = tuple(
    (f"layer{stage}.{block}", width)
    for stage, (blocks, width) in enumerate([(3, 256), (4, 512), (6, 1024), (3, 2048)], start=1)
    for block in range(blocks)
)
# the CI smoke variant: the first block of each stage, widths divided by 4
SMALL_BLOCKS = tuple((name, width // 4) for name, width in RESNET50_BLOCKS if name.endswith(".0"))


@dataclass(frozen=True)
class Workload:
    """A probing task: labels per split, and features per layer on demand (``layers()``)."""

    n_classes: int
    n_train: int = 20_000
    n_valid: int = 5_000
    n_test: int = 5_000
    blocks: tuple[tuple[str, int], ...] = RESNET50_BLOCKS
    n_inputs: int = 64
    clusters_per_class: int = 3
    noise: float = 1.0  # standard deviation of each input coordinate around its cluster centre
    residual: float = 0.5  # blocks that keep their width compute relu(h + residual * h @ W)
    seed: int = 0

    @property
    def n_samples(self) -> int:
        return self.n_train + self.n_valid + self.n_test

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def _inputs(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.n_classes])
        centers = rng.standard_normal((self.n_classes * self.clusters_per_class, self.n_inputs))
        component = rng.integers(0, len(centers), self.n_samples)
        inputs = centers[component] + self.noise * rng.standard_normal((self.n_samples, self.n_inputs))
        return inputs.astype(np.float32), (component % self.n_classes).astype(np.int64)

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        valid_end = self.n_train + self.n_valid
        return rows[: self.n_train], rows[self.n_train : valid_end], rows[valid_end:]

    def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, valid, test) integer labels in ``[0, n_classes)``."""
        return self._split(self._inputs()[1])

    def layers(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(name, train, valid, test)`` float32 features, one layer at a time, in network order.

        The network's weights depend on ``seed`` only (not on the number of classes or samples), so C = 10 and
        C = 100 probe the same network.
        """
        hidden = self._inputs()[0]
        for depth, (name, width) in enumerate(self.blocks):
            rng = np.random.default_rng([self.seed, 1000 + depth])
            fan_in = hidden.shape[1]
            weights = (rng.standard_normal((fan_in, width)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
            if self.residual and fan_in == width:
                hidden = np.maximum(hidden + self.residual * (hidden @ weights), 0.0)
            else:
                hidden = np.maximum(hidden @ weights, 0.0)
            yield (name, *self._split(hidden))


# Input noise per number of classes, tuned so that converged probes at l2 = 1e-3 land at about 8 % test error
# on layer1.0 and 25 % (C = 10) or 31 % (C = 100) on layer4.x: with 3 clusters per class, 100 classes crowd
# the input space 10 times more. The small variant has 10 times fewer samples, so it needs less noise for
# errors around 10 %.
NOISE = {10: 1.5, 100: 1.1}
SMALL_NOISE = {10: 1.0, 100: 0.5}


def resnet50_workload(n_classes: int, small: bool = False, seed: int = 0) -> Workload:
    """The benchmark's workload: 20 000 / 5 000 / 5 000 samples and 16 layers, or the small CI variant."""
    if small:
        return Workload(n_classes, 2000, 500, 500, SMALL_BLOCKS, noise=SMALL_NOISE.get(n_classes, 1.0), seed=seed)
    return Workload(n_classes, noise=NOISE.get(n_classes, 1.0), seed=seed)


def objective(standardized: np.ndarray, labels: np.ndarray, weights: np.ndarray, bias: np.ndarray, l2: float):
    """Mean cross-entropy + l2/2 ||W||^2 in float64: what probecore and the scikit-learn baselines minimise."""
    logits = standardized.astype(np.float64) @ np.asarray(weights, np.float64) + np.asarray(bias, np.float64)
    largest = logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits - largest).sum(axis=1)) + largest[:, 0]
    cross_entropy = np.mean(log_norm - logits[np.arange(len(labels)), labels])
    return float(cross_entropy + 0.5 * l2 * np.sum(np.square(weights, dtype=np.float64)))
