"""Composite activations: the islands of element-wise ops that exporters write one activation out of.

Hard-swish, GELU, Mish and others reach ONNX as a few elementary ops around one input, e.g.
``Div(Mul(x, Clip(x + 3, 0, 6)), 6)``; the layer a person means is the island's one output, not the Clip or
Erf inside it. Found by shape, not by a list of exact patterns, so other association orders work too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

ARITHMETIC_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Identity"}
CLIP_OPS = {"Clip", "Relu", "Min", "Max", "HardSigmoid"}  # piecewise linear: relu6 and hard-sigmoid
NONLINEAR_OPS = CLIP_OPS | {
    "Pow", "Sqrt", "Abs", "Exp", "Log", "Reciprocal", "Erf", "Tanh", "Sigmoid", "Softplus", "Softsign",
    "HardSwish", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Gelu", "Mish",
}  # fmt: skip
ELEMENTWISE_OPS = ARITHMETIC_OPS | NONLINEAR_OPS
# Nonlinear, but also the arithmetic of softmax and normalization (the rsqrt of a variance), which no one calls
# an activation: an island found from one of these counts only when it makes one of the named composites.
ARITHMETIC_SEED_OPS = {"Pow", "Sqrt", "Abs", "Exp", "Log", "Reciprocal"}
COMPOSITE_KINDS = {"HardSwish", "HardSigmoid", "Swish", "Gelu", "Mish"}
MAX_ISLAND_NODES = 32  # an activation is a handful of ops; this bounds the search on large element-wise regions


@dataclass
class _Graph:
    nodes: list
    constants: set
    producer: dict  # tensor -> index of the node writing it
    consumers: dict  # tensor -> indices of the nodes reading it
    outputs: set


def composite_activations(
    graph: onnx.GraphProto, constants: set[str] | None = None
) -> tuple[dict[str, str], set[str]]:
    """(exit tensor -> kind, tensors internal to the islands), for each activation island with a single exit.

    Kinds: "HardSwish", "HardSigmoid", "Swish", "Gelu", "Mish", "Clip" (relu6 written as Min/Max/Relu),
    the op type of a one-op island or one made of a single nonlinearity, else "Activation". An island whose
    inner tensors are used elsewhere too is left out: no single tensor then stands for it."""
    nodes = list(graph.node)
    consumers = defaultdict(list)
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers[name].append(index)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    constants = constant_tensors(graph) if constants is None else constants  # the caller's, when it has them
    facts = _Graph(nodes, constants, producer, consumers, {value.name for value in graph.output})
    kind_by_exit, internal = {}, set()
    for index, node in enumerate(nodes):
        seen = node.output[0] in facts.constants or node.output[0] in internal or node.output[0] in kind_by_exit
        found = None if seen or node.op_type not in NONLINEAR_OPS else _activation_around(index, facts)
        if found:
            exit_name, kind, members = found
            kind_by_exit[exit_name] = kind
            internal |= {out for member in members for out in nodes[member].output if out != exit_name}
    return kind_by_exit, internal


def _activation_around(seed: int, facts: _Graph) -> tuple[str, str, list[int]] | None:
    """(exit, kind, member nodes) of the widest single-exit island holding the seed, or None."""
    for root in reversed(_dominators(seed, facts)):  # the farthest first: the whole activation
        members = _island(root, facts)
        exits = _exits(members, facts)
        if seed not in members or len(exits) != 1:
            continue
        kind = _kind(members, root, facts)
        if facts.nodes[seed].op_type not in ARITHMETIC_SEED_OPS or kind in COMPOSITE_KINDS:
            return exits[0], kind, members
    return None


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs and whatever is computed from them alone (``Sqrt(2)``, ``Cast(6)``)."""
    constants = {init.name for init in graph.initializer} | {init.values.name for init in graph.sparse_initializer}
    for node in graph.node:
        inputs = [name for name in node.input if name]
        has_subgraph = any(attr.type in (attr.GRAPH, attr.GRAPHS) for attr in node.attribute)  # may read outer names
        if node.op_type == "Constant" or inputs and not has_subgraph and all(name in constants for name in inputs):
            constants.update(name for name in node.output if name)
    return constants


def _computed_inputs(node: onnx.NodeProto, facts: _Graph) -> list[str]:
    return [name for name in node.input if name and name not in facts.constants]


def _is_elementwise(tensor: str, facts: _Graph) -> bool:
    index = facts.producer.get(tensor)
    return index is not None and facts.nodes[index].op_type in ELEMENTWISE_OPS


def _dominators(seed: int, facts: _Graph) -> list[str]:
    """Tensors that every element-wise path back from the seed passes through, nearest first: the
    candidate inputs of its activation. Expanding the latest tensor first lets branches (``x + x**3``)
    meet again, so each time the cut is one tensor, that tensor dominates."""
    cut, found = set(_computed_inputs(facts.nodes[seed], facts)), []
    for _ in range(MAX_ISLAND_NODES):
        if len(cut) == 1:
            found.append(next(iter(cut)))
        expandable = [tensor for tensor in cut if _is_elementwise(tensor, facts)]
        if not expandable:
            break
        latest = max(expandable, key=facts.producer.get)
        cut.remove(latest)
        cut.update(_computed_inputs(facts.nodes[facts.producer[latest]], facts))
    return found


def _island(root: str, facts: _Graph) -> list[int]:
    """Indices, in graph order, of the element-wise nodes computed from ``root`` alone (and constants)."""
    tensors, members, pending = {root}, set(), [root]
    while pending and len(members) <= MAX_ISLAND_NODES:
        for index in facts.consumers.get(pending.pop(), []):
            node = facts.nodes[index]
            if index in members or node.op_type not in ELEMENTWISE_OPS:
                continue
            if all(name in tensors for name in _computed_inputs(node, facts)):
                members.add(index)
                tensors.update(node.output)
                pending.extend(node.output)
    return sorted(members) if len(members) <= MAX_ISLAND_NODES else []


def _exits(members: list[int], facts: _Graph) -> list[str]:
    """The island's tensors that something outside it reads (or that the graph returns)."""
    inside = set(members)
    produced = [out for index in members for out in facts.nodes[index].output if out]
    return [
        name for name in produced
        if name in facts.outputs or any(reader not in inside for reader in facts.consumers.get(name, []))
    ]  # fmt: skip


def _kind(members: list[int], root: str, facts: _Graph) -> str:
    """Name the activation from its ingredients: a gate ``x * f(x)`` (x affine in the root, f nonlinear)
    and which nonlinearities f is made of."""
    if len(members) == 1:
        return facts.nodes[members[0]].op_type
    affine, ops = {root}, set()
    gated = squared = offset = scaled = False
    for index in members:
        node = facts.nodes[index]
        inputs = _computed_inputs(node, facts)
        has_constant = len(inputs) < len([name for name in node.input if name])
        if node.op_type not in ARITHMETIC_OPS:
            ops.add(node.op_type)
        elif all(name in affine for name in inputs) and (len(inputs) == 1 or node.op_type in {"Add", "Sub"}):
            affine.update(node.output)
            offset |= has_constant and node.op_type in {"Add", "Sub"}
        elif node.op_type in {"Mul", "Div"} and len(inputs) == 2:
            squared |= node.op_type == "Mul" and all(name in affine for name in inputs)
            gated |= inputs[0] in affine and inputs[1] not in affine
            gated |= node.op_type == "Mul" and inputs[1] in affine and inputs[0] not in affine
        else:
            scaled |= has_constant and node.op_type in {"Mul", "Div"}
    if gated:
        if "Sigmoid" in ops:
            return "Swish"
        if "Erf" in ops or ("Tanh" in ops and ("Pow" in ops or squared)):
            return "Gelu"
        if "Tanh" in ops and ops & {"Softplus", "Log", "Exp"}:
            return "Mish"
        if ops & CLIP_OPS:
            return "HardSwish"
        if "Exp" in ops and ops <= {"Exp", "Reciprocal"}:
            return "Swish"  # x / (1 + exp(-x))
    elif ops <= CLIP_OPS and offset and scaled:
        return "HardSigmoid"  # clip(x + 3, 0, 6) / 6
    if len(ops) == 1:
        return next(iter(ops))
    return "Clip" if ops <= CLIP_OPS else "Activation"
