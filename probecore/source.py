"""Where activations come from: the protocol every backend implements, and a source for ready arrays.

The core only ever sees numpy arrays through this protocol; the ONNX backend (``probecore.backends``)
is one implementation, ``ArraySource`` another for activations computed elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import DataError, LayerSelectionError
from .reduction import Reduction


@dataclass(frozen=True)
class LayerInfo:
    """A probe-able tensor: its name, the op that makes it, and its per-sample shape (None where unknown)."""

    name: str
    op_type: str
    shape: tuple[int | None, ...] | None
    default: bool = True  # picked when the user names no layers
    is_output: bool = False  # one of the model's own outputs
    layout: str | None = None  # what the source knows of the axes, e.g. "channels_last" (Keras); None: guess
    # Where the layer sits in the model's data flow, when the source knows its graph (the ONNX backend does):
    # "main" (every path from the input to the output passes through it), "branch" (one of parallel paths: inside
    # a residual block, an Inception branch) or "side" (it only modulates the main path: a gate, attention
    # scores); and the layers it is computed from directly. None and (): unknown, the layers are read as a chain.
    role: str | None = None
    inputs: tuple[str, ...] = ()

    @property
    def n_features(self) -> int | None:
        if self.shape is None or any(d is None for d in self.shape):
            return None
        return math.prod(self.shape)


@runtime_checkable
class ActivationSource(Protocol):
    """Anything that turns inputs into per-layer activations, batch by batch."""

    def layers(self) -> list[LayerInfo]:
        """Every probe-able tensor, in the order the model computes them."""
        ...

    def check_inputs(self, x: np.ndarray) -> np.ndarray:
        """Return ``x`` ready to feed (cast if needed), or raise ``DataError`` naming what does not fit."""
        ...

    def activations(self, x: np.ndarray, layer_names: Sequence[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield, for consecutive batches of ``x``, a dict from each requested layer to its (B, ...) activations."""
        ...

    def describe(self) -> dict:
        """Facts worth recording in a report (model file and hash, execution provider, ...)."""
        ...

    def identity(self) -> dict | None:
        """What fixes the activations (e.g. the model file's hash), for cache keys; None: do not cache."""
        ...


@runtime_checkable
class ReducingSource(ActivationSource, Protocol):
    """A source that can apply planned reductions itself, e.g. inside the model's graph on the model's device,
    so that only reduced features reach the host. The features must equal ``Reduction.apply``'s."""

    def can_reduce(self, reduction: Reduction) -> bool:
        ...

    def reduced_activations(
        self, x: np.ndarray, reductions: Mapping[str, Reduction], batch_size: int, raw_names: Sequence[str] = ()
    ) -> Iterator[dict[str, np.ndarray]]:
        """Like ``activations``, but each layer of ``reductions`` comes reduced, (B, n_features_out) float32;
        ``raw_names`` come as they are."""
        ...


class ArraySource:
    """Activations already computed: one (N, ...) array per layer, addressed by integer row indices.

    Use ``np.arange(N)`` as the inputs ``x`` (e.g. ``split_dataset(np.arange(N), labels)``) so the splits
    select rows of these arrays.
    """

    def __init__(self, activations_by_layer: dict[str, np.ndarray]):
        if not activations_by_layer:
            raise LayerSelectionError("ArraySource needs at least one layer's activations")
        lengths = {name: len(array) for name, array in activations_by_layer.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"every layer needs the same number of samples, got {lengths}")
        self._arrays = dict(activations_by_layer)
        self._n_samples = next(iter(lengths.values()))

    def layers(self) -> list[LayerInfo]:
        return [LayerInfo(name, "Array", tuple(array.shape[1:])) for name, array in self._arrays.items()]

    def check_inputs(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 1 or x.dtype.kind not in "iu":
            raise DataError(f"ArraySource inputs must be 1-D integer row indices, got {x.dtype} {x.shape}")
        if len(x) and (x.min() < 0 or x.max() >= self._n_samples):
            raise DataError(f"row indices must lie in [0, {self._n_samples}); got {x.min()}..{x.max()}")
        return x

    def activations(self, x, layer_names, batch_size):
        for start in range(0, len(x), batch_size):
            rows = x[start : start + batch_size]
            yield {name: np.asarray(self._arrays[name][rows]) for name in layer_names}

    def describe(self) -> dict:
        return {"source": "arrays", "layers": len(self._arrays)}

    def identity(self) -> None:
        return None  # the activations are in memory already: nothing to gain from a cache
