"""ONNX graph work: load and validate a model, list its probe-able tensors, expose them as outputs.

Never mutates the caller's model: exposing outputs works on a copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from probecore.errors import ModelError
from probecore.source import LayerInfo

from . import onnx_activations, onnx_reduce, onnx_topology

ACTIVATION_OPS = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "Tanh", "Gelu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Clip",
}  # fmt: skip
POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
# Ops whose outputs are worth offering even when shape inference could not type them.
LAYER_OPS = ACTIVATION_OPS | POOL_OPS | {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "BatchNormalization", "LayerNormalization",
    "InstanceNormalization", "Flatten", "Concat", "Softmax", "Dropout", "Identity",
}  # fmt: skip
# Written by the framework adapters (backends/torch.py, backends/tensorflow.py): the tensors they named after
# the framework's modules or layers, with each one's kind, axes and whether it is a default pick.
LAYERS_METADATA = "probecore.layers"
OUTLINE_DATA_BYTES = 1024  # initializers above this keep only name, type and dims in a model's outline
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def load_outline(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; return it shape-inferred, without the data of its larger weights.

    Everything probecore learns from a model (its input, tensors, shapes) is in this outline, which stays small
    however large the weights: onnxruntime reads them from the files itself when a session is built
    (``read_model``). Raises ``ModelError`` saying what is wrong with the file."""
    path = Path(path)
    outline = read_model(path)
    for initializer in outline.graph.initializer:
        if initializer.ByteSize() > OUTLINE_DATA_BYTES:  # keep name, type and dims; shape inference needs no more
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                initializer.ClearField(field)
    if outline.ir_version > onnx.IR_VERSION:
        raise ModelError(_too_new(path, f"ONNX IR version {outline.ir_version}", f"onnx {onnx.__version__}",
                                  f"IR up to {onnx.IR_VERSION}"))  # fmt: skip
    try:  # from the file, so that the weights are checked too, one tensor at a time
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"{path} is not a valid ONNX model: {first_line(exc)}; re-export it") from None
    return infer_shapes(outline)


def infer_shapes(outline: onnx.ModelProto) -> onnx.ModelProto:
    """``outline`` with every tensor's type and shape that ONNX's shape inference (with data propagation,
    for shapes computed in the graph) can tell; as it is where inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(outline, data_prop=True)
    except Exception:
        return outline  # shapes are then measured on one sample


def read_model(path: str | Path) -> onnx.ModelProto:
    """Parse an ONNX file without checking it or reading its external weights (onnxruntime reads those
    itself), after making sure every external data file it names is there; or raise ``ModelError``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        model = None
    if model is None or not model.graph.node:
        raise ModelError(
            f"{path} is not an ONNX model (it does not parse as one); export it with torch.onnx.export or tf2onnx"
        )
    _check_external_data(model, path)
    return model


def external_data_files(model: onnx.ModelProto, path: str | Path) -> list[Path]:
    """The files holding ``model``'s external weights (torch's exporter writes ``model.onnx.data`` by
    default), which sit beside the .onnx file ``path``; in the order first named."""
    base = Path(path).parent
    locations = (_external_info(tensor).get("location") for tensor in _tensors(model.graph))
    return [base / location for location in dict.fromkeys(filter(None, locations))]


def model_sha256(path: str | Path, external: list[Path]) -> str:
    """What identifies a model: its file's sha256, or, where its weights are kept in external data files,
    a sha256 over the hashes of all its files, so that new weights under the same .onnx are a new model."""
    if not external:
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in [Path(path), *external]:
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Raise ``ModelError`` naming an external data file that is missing, or shorter than a tensor needs."""
    needed: dict[str, int] = {}
    for tensor in _tensors(model.graph):
        info = _external_info(tensor)
        if "location" in info:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            needed[info["location"]] = max(needed.get(info["location"], 0), end)
    for location, end in needed.items():
        file = path.parent / location
        if not file.is_file():
            raise ModelError(
                f"{path.name} keeps its weights in {location}, which is missing: looked for {file}; "
                f"put that file beside {path.name} (or re-export the model with its weights inside)"
            )
        if file.stat().st_size < end:
            raise ModelError(
                f"{file} is shorter than {path.name} expects ({file.stat().st_size} bytes, weights up to byte {end}); "
                "copy it again whole, or re-export the model"
            )


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return {}
    return {entry.key: entry.value for entry in tensor.external_data}


def _tensors(graph: onnx.GraphProto):
    """Every tensor stored in ``graph``: initializers, and constants held by node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def too_new_for_onnxruntime(path: str | Path, message: str) -> str | None:
    """The one-line fix when onnxruntime refused a model for its IR version or opset (``message`` is
    onnxruntime's error), else None."""
    import onnxruntime

    runtime = f"onnxruntime {onnxruntime.__version__}"
    ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", message)
    if ir:
        return _too_new(path, f"ONNX IR version {ir[1]}", runtime, f"IR up to {ir[2]}")
    opset = re.search(r"Opset (\d+) is under development.*?till opset (\d+)", message, re.S)
    if opset:
        return _too_new(path, f"opset {opset[1]}", runtime, f"opsets up to {opset[2]}")
    return None


def _too_new(path, what: str, installed: str, supported: str) -> str:
    return (
        f"{Path(path).name} uses {what}, newer than the installed {installed} reads ({supported}); upgrade it "
        "(pip install -U onnx onnxruntime-gpu, or onnxruntime where there is no GPU build), or re-export the model "
        "with an older opset (e.g. torch.onnx.export(..., opset_version=18))"
    )


def typed_values(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every tensor whose type is known (after shape inference), by name: all ``with_outputs`` needs to
    know of a model's shapes, a few kilobytes where the model itself may be gigabytes."""
    graph = model.graph
    return {value.name: _copy(value) for value in [*graph.value_info, *graph.input, *graph.output]}


def _copy(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A detached copy: a part of a parsed model keeps the whole model's memory alive (protobuf arenas)."""
    copied = onnx.ValueInfoProto()
    copied.CopyFrom(value)
    return copied


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The model's real inputs (initializers listed as inputs by old exporters do not count), detached."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_copy(value) for value in model.graph.input if value.name not in initializers]
    if not inputs:
        raise ModelError("the model has no inputs; export it with the input it is fed")
    return inputs


def free_dims(value: onnx.ValueInfoProto) -> list[int]:
    """Positions of the per-sample dimensions (batch axis excluded) that the model leaves open."""
    dims = tensor_dims(value) or ()
    return [axis for axis, dim in enumerate(dims) if axis > 0 and not (isinstance(dim, int) and dim > 0)]


def set_input_dims(model: onnx.ModelProto, sample_shapes: dict[str, tuple[int, ...]]) -> None:
    """Give ``model``'s inputs these per-sample dimensions (the batch axis stays as it is), in place."""
    for value in model.graph.input:
        if value.name in sample_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(list(dims)[1:], sample_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)


def with_input_dims(outline: onnx.ModelProto, sample_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``outline`` with its inputs' free dimensions fixed and every shape inferred again from them:
    what a model exported with dynamic axes (``[N, 3, H, W]``) becomes for one data set."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(outline)
    set_input_dims(fixed, sample_shapes)
    del fixed.graph.value_info[:]  # shapes inferred (or written by the exporter) for the open dimensions
    return infer_shapes(fixed)


def adapter_layers(model: onnx.ModelProto) -> dict:
    """What a framework adapter recorded of its named tensors (``LAYERS_METADATA``), or {} for other models."""
    for prop in model.metadata_props:
        if prop.key == LAYERS_METADATA:
            try:
                return json.loads(prop.value)
            except ValueError:
                return {}
    return {}


def tensor_dims(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """Each dimension as its size, its symbolic name, or None; None for a tensor of unknown rank."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def numpy_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def candidate_layers(model: onnx.ModelProto) -> list[LayerInfo]:
    """The numeric inputs and every float tensor with the input's batch axis, in graph order, marking the ones a
    person calls layers, with each one's place in the data flow (``onnx_topology``: main path, branch, side).

    Default picks: the input (float, or images of any dtype), activation and pooling outputs, residual
    additions (``Add`` of two computed tensors) and the model's outputs, unless they are side branches (a gate,
    attention scores: they modulate the main path rather than represent the input). An activation that the
    exporter wrote out of elementary ops (hard-swish as ``Div(Mul(x, Clip(x + 3, 0, 6)), 6)``, GELU with Erf,
    swish, Mish: ``onnx_activations``) is one layer, its output, listed under the activation's name; the
    tensors inside it are not default picks. An image input that the model turns channels-first itself is
    laid out channels-last.
    Tensors that a framework adapter named (``adapter_layers``) carry the module's or layer's kind and axes
    instead, and the adapter says which of them are default picks, and whether unnamed tensors may be.
    """
    graph = model.graph
    inputs = model_inputs(model)
    batch_dim = (tensor_dims(inputs[0]) or (None,))[0]
    named = adapter_layers(model)
    named_layers, others_default = named.get("layers", {}), named.get("others_default", True)
    typed = {value.name: value for value in [*graph.value_info, *graph.output]}
    constants = onnx_activations.constant_tensors(graph)
    composite, inside_composite = onnx_activations.composite_activations(graph, constants)
    outputs = {value.name for value in graph.output}
    mask = mask_input(inputs)
    flow = onnx_topology.DataFlow(graph, constants, [value.name for value in inputs if value.name != mask])

    found = []  # each tensor's LayerInfo, before its place in the data flow is known
    for source in inputs:  # numeric inputs are layers too: the raw-input baseline
        input_dims, kind = tensor_dims(source), numpy_dtype(source).kind
        if kind in "iuf" and input_dims and len(input_dims) >= 2:
            default = kind == "f" or len(input_dims) >= 4  # images of any dtype; not token ids or masks
            layout = "channels_last" if len(input_dims) == 4 and flow.channels_last(source.name) else None
            layout = named_layers.get(source.name, {}).get("layout") or layout
            found.append(LayerInfo(source.name, "Input", _sample_shape(input_dims), default=default, layout=layout))
    for node in graph.node:
        for name in node.output:
            if not name or name in constants:
                continue
            value = typed.get(name)
            if value is None:
                if node.op_type not in LAYER_OPS and name not in composite:
                    continue
                shape = None
            else:
                dims = tensor_dims(value)
                if value.type.tensor_type.elem_type not in FLOAT_TYPES or dims is None or len(dims) < 2:
                    continue
                if not _is_batch_dim(dims[0], batch_dim):
                    continue
                shape = _sample_shape(dims)
            info = named_layers.get(name, {})
            default = name in outputs or bool(info.get("default"))
            looks_like_layer = name in composite or name not in inside_composite and _looks_like_layer(node, constants)
            default = default or others_default and looks_like_layer
            op_type, layout = info.get("kind") or composite.get(name) or node.op_type, info.get("layout")
            found.append(LayerInfo(name, op_type, shape, default=default, is_output=name in outputs, layout=layout))
    main = flow.main_path()
    nearest = flow.nearest({layer.name for layer in found})
    layers = []
    for layer in found:
        role = "main" if layer.name in main else "side" if flow.is_side(layer.name) else "branch"
        default = layer.default and role != "side"
        layers.append(dataclasses.replace(layer, default=default, role=role, inputs=nearest.get(layer.name, ())))
    return layers


def mask_input(inputs: list[onnx.ValueInfoProto]) -> str | None:
    """The input that marks real tokens (``attention_mask`` and the like) in a model with several inputs."""
    if len(inputs) < 2:
        return None
    masks = [value.name for value in inputs if "mask" in value.name.lower() and len(tensor_dims(value) or ()) == 2]
    return masks[0] if len(masks) == 1 else None


def with_outputs(
    model: onnx.ModelProto, names: list[str], reductions: dict | None = None, typed: dict | None = None,
    concat: bool = False,
) -> bytes:
    """``model`` serialized with ``names`` as its graph outputs, as they are, and each layer of ``reductions``
    reduced in the graph (see ``onnx_reduce``); nodes that none of these need are left out, since
    onnxruntime runs every node of a graph whether its result is fetched or not. ``typed``: ``typed_values``
    of the shape-inferred model, when ``model`` is a fresh read without inferred shapes. With ``concat``, the
    reduced layers leave as one output, ``onnx_reduce.CONCAT`` (N, their widths summed, in the order of
    ``reductions``): one copy from the device per batch instead of one per layer.

    The changes are undone before returning, so the caller's model is left as it was without copying its
    weights. Each layer's reduction nodes go right after the graph's own nodes, deepest layer first:
    onnxruntime orders execution by a depth-first walk back from the graph's last leaf node, so this
    schedules every pooling node as soon as its layer exists, and frees each layer's full activation as
    soon as the model has used it, rather than holding all of them to the end of the run."""
    graph = model.graph
    typed = {**typed_values(model), **(typed or {})}
    n_initializers = len(graph.initializer)
    original = onnx.GraphProto()  # nodes and outputs only: small, whatever the weights
    original.node.extend(graph.node)
    original.output.extend(graph.output)
    position = {out: i for i, node in enumerate(graph.node) for out in node.output}
    try:
        del graph.output[:]
        for name in dict.fromkeys(names):
            graph.output.append(typed.get(name) or onnx.ValueInfoProto(name=name))
        batch_dim = (tensor_dims(model_inputs(model)[0]) or ("N",))[0] or "N"
        deepest_first = sorted((reductions or {}).items(), key=lambda item: -position.get(item[0], -1))
        added = []
        for layer, reduction in deepest_first:
            nodes, initializers = onnx_reduce.reduction_nodes(layer, reduction, typed.get(layer))
            added.extend(nodes)
            graph.initializer.extend(initializers)
            if not concat:
                width, reduced = reduction.n_features_out, onnx_reduce.reduced_name(layer)
                graph.output.append(helper.make_tensor_value_info(reduced, TensorProto.FLOAT, [batch_dim, width]))
        if concat and reductions:
            added.append(onnx_reduce.concat_node(list(reductions)))
            width = sum(reduction.n_features_out for reduction in reductions.values())
            graph.output.append(helper.make_tensor_value_info(onnx_reduce.CONCAT, TensorProto.FLOAT, [batch_dim, width]))
        own = list(original.node)  # one wrapper per node, held, so that ids stay valid
        needed = _needed_nodes([*own, *added], [value.name for value in graph.output])
        del graph.node[:]
        graph.node.extend(node for node in own if id(node) in needed)
        graph.node.extend(added)
        return model.SerializeToString()
    finally:
        del graph.node[:], graph.output[:], graph.initializer[n_initializers:]
        graph.node.extend(original.node)
        graph.output.extend(original.output)


def _needed_nodes(nodes, outputs: list[str]) -> set[int]:
    """ids of the nodes that ``outputs`` depend on (subgraphs of If/Loop count through their node's inputs
    and any outer names they use)."""
    producer = {out: node for node in nodes for out in node.output if out}
    needed, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(node.input)
        stack.extend(_outer_names(node))
    return needed


def _outer_names(node: onnx.NodeProto) -> list[str]:
    """Names a control-flow node's subgraphs read (they may come from the enclosing graph)."""
    names = []
    for attribute in node.attribute:
        graphs = {onnx.AttributeProto.GRAPH: [attribute.g], onnx.AttributeProto.GRAPHS: list(attribute.graphs)}
        for graph in graphs.get(attribute.type, []):
            for inner in graph.node:
                names.extend(inner.input)
                names.extend(_outer_names(inner))
    return names


def _looks_like_layer(node: onnx.NodeProto, constants: set[str]) -> bool:
    """Activation and pooling ops, and residual additions (an ``Add`` of a constant is a bias, not a residual)."""
    if node.op_type in ACTIVATION_OPS or node.op_type in POOL_OPS:
        return True
    return node.op_type == "Add" and len(node.input) == 2 and not any(name in constants for name in node.input)


def _is_batch_dim(dim, batch_dim) -> bool:
    return dim is None or batch_dim is None or dim == batch_dim or (isinstance(dim, str) and isinstance(batch_dim, str))


def _sample_shape(dims) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in dims[1:])


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
