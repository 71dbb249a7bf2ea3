"""In-graph reductions: the planned pooling and subset appended to the ONNX graph after each probed tensor.

onnxruntime then reduces on whatever device runs the model, and only the reduced features leave the session:
on a GPU that saves copying every full activation map to the host. The ops match the host kernels: tiles of
``window x window`` with ``ceil_mode=1`` and padding not counted, global pooling, a fixed column subset.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from probecore.reduction import Reduction

# AveragePool and MaxPool take ceil_mode from opset 10 on.
MIN_OPSET = 10
SUFFIX = "::probe"


def default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def reduced_name(layer: str) -> str:
    return layer + SUFFIX


def reduction_nodes(layer: str, reduction: Reduction, value: onnx.ValueInfoProto | None):
    """Nodes and initializers computing ``reduced_name(layer)``, (N, n_features_out) float32, from ``layer``."""
    prefix = f"{layer}::probe_"
    nodes, initializers = [], []
    current = layer

    def add(op_type: str, **attributes) -> None:
        nonlocal current
        output = prefix + str(len(nodes)) + "_" + op_type
        nodes.append(helper.make_node(op_type, [current, *attributes.pop("extra_inputs", [])], [output],
                                      name=output, **attributes))  # fmt: skip
        current = output

    if value is None or value.type.tensor_type.elem_type != TensorProto.FLOAT:
        add("Cast", to=TensorProto.FLOAT)
    if reduction.pool is not None:
        is_max = reduction.pool == "max"
        if reduction.layout == "sequence":
            add("Transpose", perm=[0, 2, 1])  # (N, T, D) -> (N, D, T): pool over T
            add("GlobalMaxPool" if is_max else "GlobalAveragePool")
        else:
            if reduction.layout == "channels_last":
                add("Transpose", perm=[0, 3, 1, 2])
            if reduction.pooled_shape[1:] == (1, 1):
                add("GlobalMaxPool" if is_max else "GlobalAveragePool")
            else:
                window = [reduction.window, reduction.window]
                add("MaxPool" if is_max else "AveragePool", kernel_shape=window, strides=window, ceil_mode=1)
    add("Flatten", axis=1)
    if reduction.subset is not None:
        indices = prefix + "subset"
        initializers.append(numpy_helper.from_array(reduction.subset.astype("int64"), indices))
        add("Gather", axis=1, extra_inputs=[indices])
    nodes[-1].output[0] = reduced_name(layer)
    return nodes, initializers
