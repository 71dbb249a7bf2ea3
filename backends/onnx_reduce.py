"""In-graph reductions: the planned pooling and subset appended to the ONNX graph after each probed tensor.

onnxruntime then reduces on whatever device runs the model, and only the reduced features leave the session:
on a GPU that saves copying every full activation map to the host. The ops match the host kernels: tiles of
``window x window`` with ``ceil_mode=1`` and padding not counted, global pooling, a fixed column subset, and
``pool_tokens``' pooling of a sequence over its real tokens, read from the model's own mask input.

Only ops whose signature is the same from opset 10 on are used (no ReduceSum/ReduceMax, whose ``axes`` moved
to an input in opsets 13 and 18; no Unsqueeze, Slice or GatherElements), so the nodes need not know the model's
opset: sums over tokens are global average pools, masks are applied with Where, the last real token is
found with ArgMax.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from probecore.reduction import Reduction

# AveragePool and MaxPool take ceil_mode from opset 10 on.
MIN_OPSET = 10
SUFFIX = "::probe"
CONCAT = "::probe_features"  # every reduced layer side by side: one output, one copy to the host per batch


def default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def reduced_name(layer: str) -> str:
    return layer + SUFFIX


def concat_node(layers: list[str]) -> onnx.NodeProto:
    """``CONCAT``: the reduced layers, (N, k_i) each, as one (N, sum k_i) tensor in the order given."""
    return helper.make_node("Concat", [reduced_name(layer) for layer in layers], [CONCAT], name=CONCAT, axis=1)


def split_concat(values: np.ndarray, widths: dict[str, int]) -> dict[str, np.ndarray]:
    """``CONCAT``'s (N, sum k_i) values as each layer's (N, k_i) columns (views), in the order of ``widths``."""
    ends = np.cumsum(list(widths.values()))
    return {layer: values[:, end - width : end] for (layer, width), end in zip(widths.items(), ends)}


class _Nodes:
    """The nodes and initializers of one layer's reduction, each named after the layer."""

    def __init__(self, layer: str):
        self.prefix = f"{layer}::probe_"
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def add(self, op_type: str, inputs: list[str], **attributes) -> str:
        output = self.prefix + str(len(self.nodes)) + "_" + op_type
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def constant(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), self.prefix + name))
        return self.prefix + name


def reduction_nodes(layer: str, reduction: Reduction, value: onnx.ValueInfoProto | None):
    """Nodes and initializers computing ``reduced_name(layer)``, (N, n_features_out) float32, from ``layer``."""
    graph = _Nodes(layer)
    current = layer
    if value is None or value.type.tensor_type.elem_type != TensorProto.FLOAT:
        current = graph.add("Cast", [current], to=TensorProto.FLOAT)
    if reduction.tokens is not None:
        current = _pool_tokens(graph, current, reduction)
    elif reduction.pool is not None:
        is_max = reduction.pool == "max"
        if reduction.layout == "sequence":
            current = graph.add("Transpose", [current], perm=[0, 2, 1])  # (N, T, D) -> (N, D, T): pool over T
            current = graph.add("GlobalMaxPool" if is_max else "GlobalAveragePool", [current])
        else:
            if reduction.layout == "channels_last":
                current = graph.add("Transpose", [current], perm=[0, 3, 1, 2])
            if reduction.pooled_shape[1:] == (1, 1):
                current = graph.add("GlobalMaxPool" if is_max else "GlobalAveragePool", [current])
            else:
                window = [reduction.window, reduction.window]
                pool = "MaxPool" if is_max else "AveragePool"
                current = graph.add(pool, [current], kernel_shape=window, strides=window, ceil_mode=1)
    current = graph.add("Flatten", [current], axis=1)
    if reduction.subset is not None:
        indices = graph.constant("subset", reduction.subset.astype(np.int64))
        graph.add("Gather", [current, indices], axis=1)
    graph.nodes[-1].output[0] = reduced_name(layer)
    return graph.nodes, graph.initializers


def _pool_tokens(graph: _Nodes, values: str, reduction: Reduction) -> str:
    """``pool_tokens`` on (N, T, D) float ``values``: the mean or max over real tokens, the first token or the
    last real one, zeros for a sequence with no real token (first excepted); (N, D) or (N, D, 1)."""
    n_tokens = reduction.sample_shape[0]
    if reduction.tokens == "first":
        return graph.add("Gather", [values, graph.constant("first", np.array(0, np.int64))], axis=1)
    if reduction.mask_input is None:  # every token is real
        if reduction.tokens == "last":
            return graph.add("Gather", [values, graph.constant("last", np.array(n_tokens - 1, np.int64))], axis=1)
        by_feature = graph.add("Transpose", [values], perm=[0, 2, 1])
        return graph.add("GlobalMaxPool" if reduction.tokens == "max" else "GlobalAveragePool", [by_feature])

    real = graph.add("Cast", [reduction.mask_input], to=TensorProto.BOOL)  # nonzero: real, whatever the mask's type
    real_float = graph.add("Cast", [real], to=TensorProto.FLOAT)  # (N, T)
    as_column = graph.constant("as_column", np.array([0, -1, 1], np.int64))  # (N, T) -> (N, T, 1)
    as_row = graph.constant("as_row", np.array([0, 1, -1], np.int64))  # (N, T) -> (N, 1, T)
    real_row = graph.add("Reshape", [real_float, as_row])
    if reduction.tokens == "mean":
        # sum(x * real) / max(count, 1), both sides divided by T: each a global average pool over the tokens
        masked = graph.add("Mul", [values, graph.add("Reshape", [real_float, as_column])])
        mean_of_masked = graph.add("GlobalAveragePool", [graph.add("Transpose", [masked], perm=[0, 2, 1])])
        share_real = graph.add("GlobalAveragePool", [real_row])  # count / T, (N, 1, 1)
        at_least_one = graph.add("Max", [share_real, graph.constant("one_token", np.array(1 / n_tokens, np.float32))])
        return graph.add("Div", [mean_of_masked, at_least_one])
    if reduction.tokens == "max":
        picked = real
    else:  # last: the real token of highest position (ArgMax of real * (t + 1); token 0 when none is real)
        positions = graph.constant("positions", np.arange(1, n_tokens + 1, dtype=np.float32))
        weighted = graph.add("Mul", [real_float, positions])
        last = graph.add("ArgMax", [weighted], axis=1, keepdims=1)  # (N, 1)
        picked = graph.add("Equal", [last, graph.constant("indices", np.arange(n_tokens, dtype=np.int64))])
    # max over the picked tokens: the others become -inf; Where, not a product, so that no inf * 0 makes NaN
    minus_inf = graph.constant("minus_inf", np.array(-np.inf, np.float32))
    kept = graph.add("Where", [graph.add("Reshape", [picked, as_column]), values, minus_inf])
    pooled = graph.add("GlobalMaxPool", [graph.add("Transpose", [kept], perm=[0, 2, 1])])  # (N, D, 1)
    any_real = graph.add("Cast", [graph.add("GlobalMaxPool", [real_row])], to=TensorProto.BOOL)  # (N, 1, 1)
    return graph.add("Where", [any_real, pooled, graph.constant("zero", np.array(0, np.float32))])
