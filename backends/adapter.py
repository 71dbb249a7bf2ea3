"""What the PyTorch and Keras adapters share: importing their optional framework, finishing the exported ONNX
file, and probing it on arrays.

An adapter exports the model with the output of every module or layer as an extra graph output named after
it, so the exporter gives those tensors readable names. ``finish_export`` drops the extra outputs again (the
tensors keep their names inside the graph, and ``onnx_graph.with_outputs`` exposes the ones a run asks for)
and records what each named tensor is in the file's metadata (``onnx_graph.LAYERS_METADATA``), so that
``probe layers`` and ``probe run`` on the file list them by name, kind and axes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

import probecore
from probecore.errors import ExtraNotInstalledError, ModelError
from probecore.report import write_text_atomic

from .onnx_graph import LAYERS_METADATA


@dataclass(frozen=True)
class NamedLayer:
    """A tensor an adapter named after the module or layer that makes it."""

    name: str
    kind: str  # the module's or layer's class, e.g. "Bottleneck", "Conv2D"
    layout: str | None = None  # "channels_last" for Keras feature maps; None: read from the rank
    default: bool = False  # probed when the user names no layers


def require(module: str, extra: str, framework: str):
    """Import an optional framework, or raise a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExtraNotInstalledError(
            f"{framework} is not installed; install it with: pip install 'probecore[{extra}]'"
        ) from None


def rename_values(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename tensors throughout ``model``'s main graph (where they are made, used, typed and output)."""
    names = {old: new for old, new in names.items() if old != new}
    if not names:
        return
    graph = model.graph
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]
    for value in [*graph.value_info, *graph.output]:
        value.name = names.get(value.name, value.name)


def sort_by_depth(model: onnx.ModelProto) -> None:
    """Reorder the nodes by their distance from the inputs (still a topological order), so that tensors are
    listed in model order where an exporter appended some at the end (tf2onnx's layout transposes)."""
    graph = model.graph
    nodes = list(graph.node)
    depth_of: dict[str, int] = {}
    depths = []
    for node in nodes:  # graph order is topological: producers come first
        depth = 1 + max((depth_of.get(name, 0) for name in node.input), default=0)
        depth_of.update({name: depth for name in node.output})
        depths.append(depth)
    ordered = [nodes[i] for i in sorted(range(len(nodes)), key=lambda i: depths[i])]
    kept = onnx.GraphProto()
    kept.node.extend(ordered)
    del graph.node[:]
    graph.node.extend(kept.node)


def finish_export(
    model: onnx.ModelProto, path: str | Path, outputs: Sequence[str], layers: Sequence[NamedLayer], adapter: str,
    others_default: bool,
) -> Path:  # fmt: skip
    """Keep only ``outputs`` (the model's own) as graph outputs, record ``layers`` in the metadata, and write
    ``model`` to ``path`` atomically. ``others_default``: whether unnamed tensors may be default picks (not
    where the exporter adds its own layout copies of the named ones, as tf2onnx does)."""
    graph = model.graph
    own = onnx.GraphProto()  # copies: what a repeated field lets go of must not be used again
    own.output.extend(value for value in graph.output if value.name in set(outputs))
    missing = set(outputs) - {value.name for value in own.output}
    if missing:
        raise ModelError(f"the exported model lacks the outputs {sorted(missing)}; report this as a bug")
    del graph.output[:]
    graph.output.extend(own.output)
    record = {"adapter": adapter, "others_default": others_default,
              "layers": {layer.name: {k: v for k, v in asdict(layer).items() if k != "name"} for layer in layers}}  # fmt: skip
    for prop in [prop for prop in model.metadata_props if prop.key == LAYERS_METADATA]:
        model.metadata_props.remove(prop)
    model.metadata_props.add(key=LAYERS_METADATA, value=json.dumps(record))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, model.SerializeToString())
    return path


def is_reference(text: str) -> bool:
    """Whether a model argument is ``package.module:function`` rather than a file."""
    module, colon, function = str(text).partition(":")
    names = [*module.split("."), function]
    return bool(colon) and all(name.isidentifier() for name in names) and not Path(text).exists()


def export_reference(reference: str, path: str | Path) -> Path:
    """Call ``package.module:function`` and export what it returns to ONNX at ``path``: a Keras model, or a
    torch module with its example input as ``(module, example)``. The current directory is importable, as
    with ``python -m``."""
    module_name, _, function_name = reference.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"cannot import {module_name!r} for model {reference!r} ({exc}); run from the folder that holds it, "
            "or install it"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelError(f"{module_name!r} has no function {function_name!r}; give package.module:function")
    result = function()
    model, example = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    frameworks = {cls.__module__.split(".")[0] for cls in type(model).__mro__}
    if "torch" in frameworks:
        if example is None:
            raise ModelError(f"{reference} returned a torch module alone; return (module, example_input) so it can be traced")
        from . import torch as torch_adapter

        return torch_adapter.export(model, example, path)
    if frameworks & {"keras", "tensorflow", "tf_keras"}:
        from . import tensorflow as keras_adapter

        return keras_adapter.export(model, path)
    raise ModelError(
        f"{reference} returned a {type(model).__name__}, not a torch.nn.Module or a Keras model; return one of those"
    )


@contextlib.contextmanager
def temporary_export(export: Callable[[Path], Path]) -> Iterator[Path]:
    """The ONNX file that ``export(path)`` writes into a temporary folder, removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="probecore-export-") as folder:
        yield export(Path(folder) / "model.onnx")


def probe_exported(
    path: Path, x: np.ndarray, y: np.ndarray, spec: probecore.RunSpec = probecore.RunSpec(),
    model_label: str | None = None,
) -> probecore.ProbeReport:  # fmt: skip
    """``run_probes`` on an exported model (opened on ``spec.device``), with ``x``/``y`` split stratified by
    label as ``spec`` says; ``model_label`` stands for the model in the report, instead of the temporary
    file's path."""
    from .onnx_source import OnnxSource

    source = OnnxSource(path, device=spec.device)
    dataset = probecore.split_dataset(x, y, spec.valid_fraction, spec.test_fraction, spec.seed)
    report = probecore.run_probes(source, dataset, spec)
    if model_label:
        report.settings["source"]["model"] = model_label
    return report
