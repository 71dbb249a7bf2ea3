"""Small ONNX models built inline with onnx.helper, and float64 references for them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save_model(path, nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp_weights(rng, n_in=12, n_hidden=16, n_classes=3):
    return {
        "w1": rng.normal(size=(n_hidden, n_in)).astype(np.float32),
        "b1": rng.normal(size=n_hidden).astype(np.float32),
        "w2": rng.normal(size=(n_classes, n_hidden)).astype(np.float32),
        "b2": rng.normal(size=n_classes).astype(np.float32),
    }


def mlp_reference(x, weights):
    """The MLP below in float64 numpy: hidden pre-activation, hidden ReLU, logits."""
    x = x.astype(np.float64)
    pre = x @ weights["w1"].T.astype(np.float64) + weights["b1"]
    hidden = np.maximum(pre, 0)
    return pre, hidden, hidden @ weights["w2"].T.astype(np.float64) + weights["b2"]


def save_mlp(path, weights, batch_dim="N"):
    """x (batch, n_in) -> Gemm "fc1" -> Relu "hidden" -> Gemm "logits"."""
    n_hidden, n_in = weights["w1"].shape
    n_classes = weights["w2"].shape[0]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["fc1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["fc1"], ["hidden"], name="hidden"),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], transB=1, name="logits"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, n_in])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, n_classes])]
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    return save_model(path, nodes, inputs, outputs, initializers)


def save_convnet(path, rng, channels=4, size=8, n_classes=3):
    """x (N, 3, size, size) -> Conv -> Relu -> residual Add -> swish (x * sigmoid x) -> MaxPool -> Flatten -> Gemm."""
    conv_w = rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)
    conv2_w = rng.normal(size=(channels, channels, 3, 3)).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    n_flat = channels * (size // 2) ** 2
    fc_w = rng.normal(size=(n_classes, n_flat)).astype(np.float32)
    fc_b = np.zeros(n_classes, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("Conv", ["relu", "conv2_w"], ["conv2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["conv2", "relu"], ["block"], name="block"),
        helper.make_node("Add", ["block", "bias"], ["biased"], name="biased"),
        helper.make_node("Sigmoid", ["biased"], ["gate"], name="gate"),
        helper.make_node("Mul", ["biased", "gate"], ["swish"], name="swish"),
        helper.make_node("MaxPool", ["swish"], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="logits"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])]
    initializers = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(conv2_w, "conv2_w"),
        numpy_helper.from_array(bias.reshape(1, channels, 1, 1), "bias"),
        numpy_helper.from_array(fc_w, "fc_w"),
        numpy_helper.from_array(fc_b, "fc_b"),
    ]
    return save_model(path, nodes, inputs, outputs, initializers)


def save_open_convnet(path, rng, height="H", width="W", external_data=False, n_classes=3):
    """x (N, 3, height, width) -> Conv "conv1" -> Relu "relu1" -> MaxPool "pool1" -> Conv -> Relu "relu2" ->
    GlobalAveragePool "gap" -> Flatten -> Gemm "logits": a fully convolutional net that takes any image size,
    as detectors and OCR models are exported (height/width: a name, None for an unnamed open dimension, or a
    size). ``external_data`` keeps the weights in ``<name>.data`` beside it, as torch's exporter does."""
    weights = {
        "conv1_w": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "conv2_w": rng.normal(size=(16, 8, 3, 3)).astype(np.float32) / 5,
        "fc_w": rng.normal(size=(n_classes, 16)).astype(np.float32),
        "fc_b": np.zeros(n_classes, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1_w"], ["conv1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["pool1", "conv2_w"], ["conv2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="logits"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, height, width])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])]
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    graph = helper.make_graph(nodes, "open", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def save_long_named_chain(path, rng, n_blocks=3, n_in=12, width=16, n_classes=3):
    """x -> n_blocks of (Gemm, Relu) -> Gemm "logits", its tensors named as torch's exporter names a
    transformer's (``/encoder/layer.0/intermediate/intermediate_act_fn/Relu_output_0``): longer than any
    table column."""
    nodes, initializers, previous = [], [], "x"
    for block in range(n_blocks):
        prefix = f"/encoder/layer.{block}/intermediate"
        dense, act = f"{prefix}/dense/Gemm_output_0", f"{prefix}/intermediate_act_fn/Relu_output_0"
        weight = rng.normal(size=(width, n_in if block == 0 else width)).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{block}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{block}")]
        nodes += [helper.make_node("Gemm", [previous, f"w{block}", f"b{block}"], [dense], transB=1, name=f"gemm{block}"),
                  helper.make_node("Relu", [dense], [act], name=f"relu{block}")]  # fmt: skip
        previous = act
    head = rng.normal(size=(n_classes, width)).astype(np.float32)
    initializers += [numpy_helper.from_array(head, "w_out"), numpy_helper.from_array(np.zeros(n_classes, np.float32), "b_out")]
    nodes.append(helper.make_node("Gemm", [previous, "w_out", "b_out"], ["logits"], transB=1, name="logits"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])]
    return save_model(path, nodes, inputs, outputs, initializers)
