"""How a model's data flows: what each tensor is computed from, the main path, side branches, input layouts.

A probe report is read along the graph, not along a list: a layer is compared with the layers it is computed
from, and not every tensor carries the whole representation.

- The *main path* is the tensors every path from the model's inputs to its outputs passes through (in a ResNet
  the block outputs, in a transformer the layer outputs), and copies of them in another layout: each holds
  everything the rest of the model sees.
- A *branch* tensor lies on one of several parallel paths (inside a residual block, an Inception branch): it
  carries part of the signal, merged back by an addition or a concatenation.
- A *side* tensor only modulates the main path: it enters it through products alone (a squeeze-and-excitation
  gate, attention scores and probabilities), so it is not a representation of the input at all.

Only data edges count: shape computations (``Shape`` -> ``Gather`` -> ``Reshape``) and constants do not, nor
does the attention mask, whose bias joins every layer.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import onnx

SHAPE_OPS = {"Shape", "Size"}  # their outputs depend on a tensor's shape, not on its values
PRODUCT_OPS = {"Mul", "Div", "MatMul", "Einsum"}
ELEMENTWISE_OPS = {"Cast", "Add", "Sub", "Mul", "Div", "Identity", "Neg", "Clip"}
# The same values laid out otherwise: a copy of a main-path tensor is on the main path too (tf2onnx exposes each
# Keras layer as a channels-last copy of the channels-first tensor the graph goes on with).
VIEW_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
NCHW_FROM_NHWC = [0, 3, 1, 2]


class DataFlow:
    """The data edges of a graph whose nodes are in topological order (as ONNX requires)."""

    def __init__(self, graph: onnx.GraphProto, constants: set[str], sources: list[str]):
        self.nodes = list(graph.node)
        self.outputs = [value.name for value in graph.output]
        static = set(constants)  # constants and what is computed from shapes and constants alone
        for node in self.nodes:
            if node.op_type in SHAPE_OPS or all(name in static for name in node.input if name):
                static.update(name for name in node.output if name)
        self.inputs: dict[str, list[str]] = {}  # tensor -> the data tensors its node reads
        self.consumers: dict[str, list[int]] = defaultdict(list)  # tensor -> indices of the nodes reading it
        for index, node in enumerate(self.nodes):
            data = [name for name in dict.fromkeys(node.input) if name and name not in static]
            for name in data:
                self.consumers[name].append(index)
            for output in node.output:
                if output and output not in static:
                    self.inputs[output] = data
        self.sources = sources
        self.reached = self._reachable(sources)  # what the sources' values flow into

    def _reachable(self, sources: list[str]) -> set[str]:
        reached = set(sources)
        for node in self.nodes:
            if any(name in reached for name in node.input):
                reached.update(name for name in node.output if name in self.inputs)
        return reached

    def main_path(self) -> set[str]:
        """Tensors that every path from the sources to the outputs passes through (dominators of the outputs),
        by the iterative algorithm of Cooper, Harvey and Kennedy on a DAG in topological order."""
        root = object()
        parent: dict = {name: root for name in self.sources}
        depth: dict = {root: 0, **{name: 1 for name in self.sources}}

        def meet(a, b):
            while a != b:
                if depth[a] < depth[b]:
                    a, b = b, a
                a = parent[a]
            return a

        def dominator(preds):
            reached = [name for name in preds if name in parent]
            if not reached:
                return None
            common = reached[0]
            for name in reached[1:]:
                common = meet(common, name)
            return common

        for node in self.nodes:
            for output in node.output:
                if output in self.reached and output not in parent:
                    common = dominator(self.inputs.get(output, []))
                    if common is not None:
                        parent[output], depth[output] = common, depth[common] + 1
        common = dominator(self.outputs)
        main = set()
        while common is not None and common != root:
            main.add(common)
            common = parent[common]
        for node in self.nodes:
            if node.op_type in VIEW_OPS and self.inputs.get(node.output[0]) and self.inputs[node.output[0]][0] in main:
                main.add(node.output[0])
        return main

    def is_side(self, tensor: str) -> bool:
        """Whether ``tensor`` reaches the rest of the model only as a factor of products with tensors it does not
        depend on (a gate, attention scores): followed forward until each path meets such another tensor."""
        if tensor not in self.reached:
            return False
        depends, merges = {tensor}, []
        pending = list(self.consumers.get(tensor, []))
        heapq.heapify(pending)
        seen = set()
        while pending:
            index = heapq.heappop(pending)
            if index in seen:
                continue
            seen.add(index)
            node = self.nodes[index]
            others = [name for name in node.input if name in self.reached and name not in depends]
            if others:  # the tensor meets the rest of the model here
                merges.append(node.op_type in PRODUCT_OPS)
                continue
            for output in node.output:
                if output in self.inputs:
                    if output in self.outputs:
                        return False  # it is (part of) what the model returns
                    depends.add(output)
                    for consumer in self.consumers.get(output, []):
                        heapq.heappush(pending, consumer)
        return bool(merges) and all(merges)

    def nearest(self, candidates: set[str]) -> dict[str, tuple[str, ...]]:
        """For each candidate, the candidates it is computed from directly: the nearest ones upstream along
        data edges, through tensors that are not candidates."""
        front: dict[str, tuple[str, ...]] = {name: (name,) for name in self.sources if name in candidates}
        nearest = {}
        for node in self.nodes:
            for output in node.output:
                if output not in self.inputs:
                    continue
                upstream = tuple(dict.fromkeys(c for name in self.inputs[output] for c in front.get(name, ())))
                if output in candidates:
                    nearest[output], front[output] = upstream, (output,)
                else:
                    front[output] = upstream
        return nearest

    def channels_last(self, name: str) -> bool:
        """Whether the model reads 4-D input ``name`` as (N, H, W, C): it turns it channels-first by a
        ``Transpose(perm=[0, 3, 1, 2])`` after element-wise steps only (casting, scaling), as tf2onnx and a torch
        ``x.permute(0, 3, 1, 2)`` do."""
        pending = [name]
        while pending:
            for index in self.consumers.get(pending.pop(), []):
                node = self.nodes[index]
                if node.op_type == "Transpose":
                    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                    if perm == NCHW_FROM_NHWC:
                        return True
                elif node.op_type in ELEMENTWISE_OPS:
                    pending.extend(output for output in node.output if output in self.inputs)
        return False
