"""Composite activations: each written-out activation is found by its one output, whatever the association
order, its inner tensors are internal, and islands that do not stand for one tensor are left alone."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_convnet, save_model

from probecore.backends.onnx_activations import composite_activations

SCALARS = {
    "zero": 0.0, "one": 1.0, "half": 0.5, "three": 3.0, "six": 6.0, "sixth": 1 / 6, "sqrt2": 1.4142135,
    "cubic": 0.044715, "sqrt_2_pi": 0.7978846, "leak": 0.01,
}  # fmt: skip


def node(op_type, inputs, output, **attributes):
    return helper.make_node(op_type, inputs, [output], name=output, **attributes)


def tanh_gelu_inner(cube):
    """tanh(sqrt(2/pi) * (pre + 0.044715 * cube)) as "tanh", given the nodes that make ``cube``."""
    return [
        *cube,
        node("Mul", ["cube", "cubic"], "cubic_term"),
        node("Add", ["pre", "cubic_term"], "inner"),
        node("Mul", ["sqrt_2_pi", "inner"], "scaled"),
        node("Tanh", ["scaled"], "tanh"),
        node("Add", ["tanh", "one"], "tanh_1"),
    ]


# pattern name: (nodes from "pre" to "act", expected kind, tensors that must be internal)
PATTERNS = {
    "hardswish_div_outside": ([
        node("Add", ["pre", "three"], "shifted"),
        node("Clip", ["shifted", "zero", "six"], "clip"),
        node("Mul", ["pre", "clip"], "gated"),
        node("Div", ["gated", "six"], "act"),
    ], "HardSwish", {"shifted", "clip", "gated"}),
    "hardswish_div_inside": ([
        node("Add", ["pre", "three"], "shifted"),
        node("Clip", ["shifted", "zero", "six"], "clip"),
        node("Div", ["clip", "six"], "hard_sigmoid"),
        node("Mul", ["hard_sigmoid", "pre"], "act"),
    ], "HardSwish", {"clip", "hard_sigmoid"}),
    "hardswish_hardsigmoid_op": ([
        node("HardSigmoid", ["pre"], "hard_sigmoid", alpha=1 / 6),
        node("Mul", ["pre", "hard_sigmoid"], "act"),
    ], "HardSwish", {"hard_sigmoid"}),
    "hardsigmoid_clip_div": ([
        node("Add", ["pre", "three"], "shifted"),
        node("Clip", ["shifted", "zero", "six"], "clip"),
        node("Div", ["clip", "six"], "act"),
    ], "HardSigmoid", {"shifted", "clip"}),
    "hardsigmoid_clip_mul": ([
        node("Add", ["three", "pre"], "shifted"),
        node("Clip", ["shifted", "zero", "six"], "clip"),
        node("Mul", ["sixth", "clip"], "act"),
    ], "HardSigmoid", {"clip"}),
    "hardsigmoid_min_max": ([
        node("Add", ["pre", "three"], "shifted"),
        node("Max", ["shifted", "zero"], "floor"),
        node("Min", ["floor", "six"], "clip"),
        node("Div", ["clip", "six"], "act"),
    ], "HardSigmoid", {"floor", "clip"}),
    "relu6_min_max": ([node("Max", ["pre", "zero"], "floor"), node("Min", ["floor", "six"], "act")], "Clip", {"floor"}),
    "relu6_min_relu": ([node("Relu", ["pre"], "floor"), node("Min", ["six", "floor"], "act")], "Clip", {"floor"}),
    "silu": ([node("Sigmoid", ["pre"], "sigmoid"), node("Mul", ["pre", "sigmoid"], "act")], "Swish", {"sigmoid"}),
    "silu_written_out": ([
        node("Neg", ["pre"], "negated"),
        node("Exp", ["negated"], "exp"),
        node("Add", ["exp", "one"], "denominator"),
        node("Div", ["pre", "denominator"], "act"),
    ], "Swish", {"exp", "denominator"}),
    "gelu_erf_half_last": ([
        node("Div", ["pre", "sqrt2"], "scaled"),
        node("Erf", ["scaled"], "erf"),
        node("Add", ["erf", "one"], "erf_1"),
        node("Mul", ["pre", "erf_1"], "gated"),
        node("Mul", ["gated", "half"], "act"),
    ], "Gelu", {"erf", "erf_1", "gated"}),
    "gelu_erf_half_first": ([
        node("Mul", ["pre", "half"], "half_pre"),
        node("Div", ["pre", "sqrt2"], "scaled"),
        node("Erf", ["scaled"], "erf"),
        node("Add", ["one", "erf"], "erf_1"),
        node("Mul", ["half_pre", "erf_1"], "act"),
    ], "Gelu", {"half_pre", "erf", "erf_1"}),
    "gelu_tanh_pow": ([
        *tanh_gelu_inner([node("Pow", ["pre", "three"], "cube")]),
        node("Mul", ["half", "tanh_1"], "half_tanh"),
        node("Mul", ["pre", "half_tanh"], "act"),
    ], "Gelu", {"cube", "tanh", "half_tanh"}),
    "gelu_tanh_products": ([
        *tanh_gelu_inner([node("Mul", ["pre", "pre"], "square"), node("Mul", ["pre", "square"], "cube")]),
        node("Mul", ["pre", "tanh_1"], "gated"),
        node("Mul", ["half", "gated"], "act"),
    ], "Gelu", {"square", "cube", "tanh", "gated"}),
    "mish_softplus": ([
        node("Softplus", ["pre"], "softplus"),
        node("Tanh", ["softplus"], "tanh"),
        node("Mul", ["pre", "tanh"], "act"),
    ], "Mish", {"softplus", "tanh"}),
    "mish_log_exp": ([
        node("Exp", ["pre"], "exp"),
        node("Add", ["exp", "one"], "exp_1"),
        node("Log", ["exp_1"], "softplus"),
        node("Tanh", ["softplus"], "tanh"),
        node("Mul", ["tanh", "pre"], "act"),
    ], "Mish", {"exp", "softplus", "tanh"}),
    "leaky_relu_max": ([
        node("Mul", ["pre", "leak"], "leaked"), node("Max", ["pre", "leaked"], "act"),
    ], "Max", {"leaked"}),
}  # fmt: skip


def save_wrapped(path, rng, pattern, root, extra_outputs=()):
    """``pattern`` (nodes from "pre" to "act") inside a small network whose "pre" is a Conv, a Gemm or a
    MatMul plus bias, and whose "act" feeds the next layer. Half the scalars are Constant nodes."""
    width = 4
    conv_w, conv2_w = (rng.normal(size=(width, c, 3, 3)).astype(np.float32) for c in (3, width))
    fc_w, fc_b = rng.normal(size=(width, width)).astype(np.float32), rng.normal(size=width).astype(np.float32)
    weights = {"conv_w": conv_w, "conv2_w": conv2_w, "fc_w": fc_w, "fc_b": fc_b}
    if root == "conv":
        x_shape, out_shape = ["N", 3, 8, 8], ["N", width, 8, 8]
        head = [node("Conv", ["x", "conv_w"], "pre", pads=[1, 1, 1, 1])]
        tail = [node("Conv", ["act", "conv2_w"], "out", pads=[1, 1, 1, 1])]
    else:
        x_shape = out_shape = ["N", width]
        head = {
            "gemm": [node("Gemm", ["x", "fc_w", "fc_b"], "pre", transB=1)],
            "matmul_bias": [node("MatMul", ["x", "fc_w"], "product"), node("Add", ["product", "fc_b"], "pre")],
        }[root]
        tail = [node("Gemm", ["act", "fc_w", "fc_b"], "out", transB=1)]
    scalars = [numpy_helper.from_array(np.array(value, np.float32), name) for name, value in SCALARS.items()]
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in scalars[::2]]
    initializers = [*scalars[1::2], *(numpy_helper.from_array(value, name) for name, value in weights.items())]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, out_shape) for name in ("out", *extra_outputs)]
    return save_model(path, [*constants, *head, *pattern, *tail], inputs, outputs, initializers)


def activations_of(path):
    return composite_activations(onnx.load(str(path)).graph)


@pytest.mark.parametrize("root", ["conv", "gemm", "matmul_bias"])
@pytest.mark.parametrize("name", PATTERNS)
def test_each_pattern_is_found_by_its_output(tmp_path, rng, name, root):
    pattern, kind, inner = PATTERNS[name]
    kind_by_exit, internal = activations_of(save_wrapped(tmp_path / "m.onnx", rng, pattern, root))
    assert kind_by_exit == {"act": kind}
    assert inner <= internal
    if root == "matmul_bias":  # the bias joins the island: the root is the product
        assert "pre" in internal and "product" not in internal
    assert not internal & {"x", "act", "out"}


def test_an_island_used_elsewhere_inside_is_left_alone(tmp_path, rng):
    silu, _, _ = PATTERNS["silu"]
    path = save_wrapped(tmp_path / "m.onnx", rng, silu, "conv", extra_outputs=["sigmoid"])
    assert activations_of(path) == ({}, set())


def test_a_lone_relu_is_its_own_island(tmp_path, rng):
    path = save_wrapped(tmp_path / "m.onnx", rng, [node("Relu", ["pre"], "act")], "conv")
    assert activations_of(path) == ({"act": "Relu"}, set())


def test_squeeze_excitation_gate_keeps_the_main_path_out(tmp_path, rng):
    """``main * hard_sigmoid(conv(pool(main)))``: the gate's root is the squeeze conv, not ``main``."""
    hard_sigmoid, _, _ = PATTERNS["hardsigmoid_clip_div"]
    excite = [node("GlobalAveragePool", ["main"], "pooled"), node("Conv", ["pooled", "se_w"], "pre")]
    gate = list(hard_sigmoid)
    gate[-1] = node("Div", ["clip", "six"], "gate")
    nodes = [
        node("Conv", ["x", "conv_w"], "conv"), node("Relu", ["conv"], "main"), *excite, *gate,
        node("Mul", ["main", "gate"], "act"),
    ]  # fmt: skip
    conv_w, se_w = (rng.normal(size=(4, c, 1, 1)).astype(np.float32) for c in (3, 4))
    scalars = {name: np.array(SCALARS[name], np.float32) for name in ("zero", "three", "six")}
    initializers = [numpy_helper.from_array(v, k) for k, v in {"conv_w": conv_w, "se_w": se_w, **scalars}.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("act", TensorProto.FLOAT, ["N", 4, 8, 8])]
    kind_by_exit, internal = activations_of(save_model(tmp_path / "m.onnx", nodes, inputs, outputs, initializers))
    assert kind_by_exit == {"main": "Relu", "gate": "HardSigmoid"}
    assert internal == {"shifted", "clip"}


def test_residual_and_bias_additions_stay_outside(tmp_path, rng):
    """The test convnet: Relu, a residual Add, a bias Add, then swish. The residual Add is no part of an
    island; the bias Add is inside the swish."""
    kind_by_exit, internal = activations_of(save_convnet(tmp_path / "m.onnx", rng))
    assert kind_by_exit == {"relu": "Relu", "swish": "Swish"}
    assert internal == {"biased", "gate"}


def test_normalization_arithmetic_is_no_activation(tmp_path):
    """A layer norm written out (the rsqrt of a variance) and a softmax (exp over a sum) hold no activation."""
    nodes = [
        node("ReduceMean", ["x"], "mean", axes=[-1]), node("Sub", ["x", "mean"], "centered"),
        node("Pow", ["centered", "two"], "squared"), node("ReduceMean", ["squared"], "variance", axes=[-1]),
        node("Add", ["variance", "eps"], "variance_eps"), node("Sqrt", ["variance_eps"], "std"),
        node("Div", ["centered", "std"], "normed"), node("Exp", ["normed"], "exp"),
        node("ReduceSum", ["exp"], "total", keepdims=1), node("Div", ["exp", "total"], "out"),
    ]  # fmt: skip
    scalars = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in {"two": 2.0, "eps": 1e-5}.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 6])]
    path = save_model(tmp_path / "m.onnx", nodes, inputs, outputs, scalars, opset=17)
    assert activations_of(path) == ({}, set())


# torch module, its kind, and the op writing its output: (dynamo, opset 18), (TorchScript, opset 13)
TORCH_ACTIVATIONS = [
    ("Hardswish", {}, "HardSwish", "HardSwish", "Mul"),  # opset 13 has no HardSwish: HardSigmoid, Mul
    ("GELU", {}, "Gelu", "Mul", "Mul"),  # Gelu is opset 20: both write out erf
    ("GELU", {"approximate": "tanh"}, "Gelu", "Mul", "Mul"),  # Pow(x, 3) by dynamo, x * x * x by TorchScript
    ("Mish", {}, "Mish", "Mish", "Mul"),  # Softplus, Tanh, Mul by TorchScript
    ("SiLU", {}, "Swish", "Mul", "Mul"),
    ("Hardsigmoid", {}, "HardSigmoid", "HardSigmoid", "HardSigmoid"),
    ("ReLU6", {}, "Clip", "Clip", "Clip"),
]


@pytest.mark.parametrize("dynamo, opset", [(True, 18), (False, 13)], ids=["dynamo", "torchscript"])
def test_torch_exports(tmp_path, dynamo, opset):
    """Each activation of a torch network is found by the tensor feeding the next Conv, and nothing else is."""
    torch = pytest.importorskip("torch")
    if dynamo:
        pytest.importorskip("onnxscript")
    layers = []
    for name, options, *_ in TORCH_ACTIVATIONS:
        layers += [torch.nn.Conv2d(4 if layers else 3, 4, 3, padding=1), getattr(torch.nn, name)(**options)]
    network = torch.nn.Sequential(*layers, torch.nn.Conv2d(4, 4, 1), torch.nn.Flatten(), torch.nn.Linear(256, 3))
    path = tmp_path / "net.onnx"
    torch.onnx.export(network.eval(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=dynamo, opset_version=opset)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    kind_by_exit, internal = composite_activations(graph)

    feeds = [node.input[0] for node in graph.node if node.op_type == "Conv"][1:]
    producer = {out: node.op_type for node in graph.node for out in node.output}
    assert kind_by_exit == {feed: row[2] for feed, row in zip(feeds, TORCH_ACTIVATIONS)}
    assert [producer[feed] for feed in feeds] == [row[3] if dynamo else row[4] for row in TORCH_ACTIVATIONS]
    assert not internal & set(feeds)
    inner_ops = {"Erf", "Tanh", "Sigmoid", "Softplus", "Pow", "HardSigmoid"}
    assert {out for node in graph.node if node.op_type in inner_ops for out in node.output} - set(feeds) <= internal


def save_mobilenet_v3_block(path, rng):
    """A MobileNetV3-style inverted residual as another framework's exporter writes it: hard-swish written
    out as Div(Mul(x, Clip(x + 3, 0, 6)), 6), a squeeze-and-excitation gate ending in a written-out
    hard-sigmoid, a projection, a bias Add and the residual Add, then global pooling and a classifier."""
    def weight(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) / 3, name)

    scalars = [numpy_helper.from_array(np.array(value, np.float32), name) for name, value in SCALARS.items()]
    nodes = [
        node("Conv", ["x", "expand_w"], "expand", pads=[0, 0, 0, 0]),
        node("Add", ["expand", "three"], "hs1_shift"), node("Clip", ["hs1_shift", "zero", "six"], "hs1_clip"),
        node("Mul", ["expand", "hs1_clip"], "hs1_mul"), node("Div", ["hs1_mul", "six"], "hswish1"),
        node("Conv", ["hswish1", "dw_w"], "depthwise", pads=[1, 1, 1, 1], group=16),
        node("Add", ["depthwise", "three"], "hs2_shift"), node("Clip", ["hs2_shift", "zero", "six"], "hs2_clip"),
        node("Mul", ["depthwise", "hs2_clip"], "hs2_mul"), node("Div", ["hs2_mul", "six"], "hswish2"),
        node("GlobalAveragePool", ["hswish2"], "se_pool"),
        node("Conv", ["se_pool", "se1_w"], "se_reduce"), node("Relu", ["se_reduce"], "se_relu"),
        node("Conv", ["se_relu", "se2_w"], "se_expand"),
        node("Add", ["se_expand", "three"], "hsig_shift"), node("Clip", ["hsig_shift", "zero", "six"], "hsig_clip"),
        node("Div", ["hsig_clip", "six"], "se_gate"),
        node("Mul", ["hswish2", "se_gate"], "excited"),
        node("Conv", ["excited", "project_w"], "project"),
        node("Add", ["project", "project_b"], "project_biased"),
        node("Add", ["project_biased", "x"], "residual"),
        node("GlobalAveragePool", ["residual"], "pool"), node("Flatten", ["pool"], "flat"),
        node("Gemm", ["flat", "fc_w"], "logits", transB=1),
    ]  # fmt: skip
    weights = [weight("expand_w", 16, 4, 1, 1), weight("dw_w", 16, 1, 3, 3), weight("se1_w", 8, 16, 1, 1),
               weight("se2_w", 16, 8, 1, 1), weight("project_w", 4, 16, 1, 1), weight("project_b", 1, 4, 1, 1),
               weight("fc_w", 3, 4)]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])]
    return save_model(path, nodes, inputs, outputs, weights + scalars)


def test_default_layers_of_a_mobilenet_v3_block_are_the_activations_outputs(tmp_path, rng):
    from probecore.backends.onnx_source import OnnxSource

    layers = OnnxSource(save_mobilenet_v3_block(tmp_path / "mbv3.onnx", rng)).layers()
    defaults = {layer.name: layer.op_type for layer in layers if layer.default}
    assert defaults == {
        "x": "Input", "hswish1": "HardSwish", "hswish2": "HardSwish", "residual": "Add",
        "pool": "GlobalAveragePool", "logits": "Gemm",
    }  # fmt: skip
    roles = {layer.name: layer.role for layer in layers}
    # the squeeze-and-excitation gate only modulates the block: a side branch, there for --layers, not a default
    assert {roles[name] for name in ("se_pool", "se_relu", "se_gate")} == {"side"} and roles["se_gate"] == "side"
    assert roles["hswish2"] == roles["excited"] == "branch" and roles["residual"] == roles["x"] == "main"
    listed = {layer.name for layer in layers}
    assert {"hs1_clip", "hsig_clip", "project_biased", "excited"} <= listed  # still there for --layers, not defaults
