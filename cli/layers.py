"""``probe layers``: the probe-able tensors of an ONNX model."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .models import model_source
from .output import console, user_errors


def layers_command(
    model: str = typer.Argument(
        ..., help="The ONNX model file, or package.module:function returning a Keras model or (torch module, "
        "example input).", show_default=False,
    ),
    all_layers: bool = typer.Option(
        False, "--all", help="List every probe-able tensor, not only the default layers (activations, blocks)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List the tensors that can be probed: name, op type, per-sample shape, feature count and role (main path,
    branch, or side branch: a gate or attention scores, not a default layer).

    Example: probe layers model.onnx --all
    """
    with user_errors(), model_source(model) as source:
        layers = source.layers()
    shown = layers if all_layers else [layer for layer in layers if layer.default]
    if as_json:
        rows = [
            {"name": layer.name, "op_type": layer.op_type, "shape": _shape(layer.shape), "features": layer.n_features,
             "default": layer.default, "output": layer.is_output, "role": layer.role}
            for layer in shown
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{'All probe-able tensors' if all_layers else 'Default layers'} of {Path(model).name}")
    # raw: before any reduction; `probe run` shows the "features used" after it
    for column in ("layer", "op", "shape", "features (raw)", "role", "default"):
        table.add_column(column, justify="right" if column.startswith("features") else "left")
    for layer in shown:
        shape = "x".join("?" if d is None else str(d) for d in _shape(layer.shape) or ["?"])
        features = "?" if layer.n_features is None else str(layer.n_features)
        table.add_row(layer.name, layer.op_type, shape, features, layer.role or "", "yes" if layer.default else "")
    console.print(table)
    if not all_layers and len(shown) < len(layers):
        console.print(f"{len(layers) - len(shown)} more with --all")


def _shape(shape):
    return None if shape is None else list(shape)
