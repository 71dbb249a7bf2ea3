"""Choosing layers by exact name, glob pattern or op type, with close-match hints for typos."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from .errors import LayerSelectionError
from .source import LayerInfo


def parse_layer_spec(spec: str) -> list[str]:
    """Split a comma-separated ``--layers`` value into entries (``op:Relu,Add`` keeps both as op types)."""
    entries, mode = [], "name"
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith(("op:", "name:")):
            mode, _, entry = entry.partition(":")
        entries.append(f"{mode}:{entry}")
    return entries


def select_layers(available: Sequence[LayerInfo], entries: Sequence[str] | None) -> list[LayerInfo]:
    """The layers that ``entries`` pick, in model order; the default layers when ``entries`` is empty.

    Each entry is ``name:X`` (an exact name or a glob such as ``layer3.*``), ``op:T`` (every tensor made by
    op type T) or a bare ``X`` (same as ``name:X``). Every entry must match something.
    """
    if not entries:
        chosen = [layer for layer in available if layer.default]
        if not chosen:
            raise LayerSelectionError("the model has no probe-able layers; list them with `probe layers MODEL --all`")
        return chosen
    names = [layer.name for layer in available]
    op_types = sorted({layer.op_type for layer in available})
    picked: set[str] = set()
    for entry in entries:
        mode, _, value = entry.partition(":") if entry.startswith(("op:", "name:")) else ("name", "", entry)
        if mode == "op":
            matches = [layer.name for layer in available if layer.op_type.lower() == value.lower()]
            if not matches:
                raise LayerSelectionError(f"no layer is made by op type {value!r}; op types here: {', '.join(op_types)}")
        elif any(ch in value for ch in "*?["):
            matches = fnmatch.filter(names, value)
            if not matches:
                raise LayerSelectionError(
                    f"pattern {value!r} matches no layer; list the names with `probe layers MODEL --all`"
                )
        else:
            if value not in names:
                close = difflib.get_close_matches(value, names, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}?" if close else "list them with `probe layers MODEL --all`"
                raise LayerSelectionError(f"unknown layer {value!r}; {hint}")
            matches = [value]
        picked.update(matches)
    return [layer for layer in available if layer.name in picked]


def probed_parents(available: Sequence[LayerInfo], chosen: Sequence[LayerInfo]) -> dict[str, list[str]]:
    """For each chosen layer, the chosen layers it is computed from directly: the nearest ones upstream in the
    source's data flow (``LayerInfo.inputs``), through layers not chosen. Empty where the source knows no graph."""
    names = {layer.name for layer in chosen}
    front: dict[str, tuple[str, ...]] = {}  # layer -> the chosen layers that stand for it upstream
    parents = {}
    for layer in available:  # in graph order: every layer's inputs come before it
        upstream = tuple(dict.fromkeys(parent for name in layer.inputs for parent in front.get(name, ())))
        if layer.name in names:
            parents[layer.name], front[layer.name] = list(upstream), (layer.name,)
        else:
            front[layer.name] = upstream
    return {name: parents.get(name, []) for name in names}
