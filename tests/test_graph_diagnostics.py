"""Diagnostics that follow the graph, on models built here and probed with their default layers: healthy
squeeze-and-excitation, Inception-style and residual models give no finding; a chain of layers that a skip
goes around, and that reads the labels worse than the input, is the paper's dead segment (section 5.1)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_model

import probecore
from probecore.backends.onnx_source import OnnxSource

CHANNELS, SIZE, CLASSES = 4, 6, 4


def images(rng, n=1600):
    """Positive images whose class is the brightest channel: any layer that keeps the channels reads it."""
    labels = rng.integers(0, CLASSES, n)
    x = rng.uniform(0.2, 1.0, (n, CHANNELS, SIZE, SIZE)).astype(np.float32)
    x[np.arange(n), labels] += 0.4
    return x, labels


def identity_conv(name, channels_out=CHANNELS, channels_in=CHANNELS, rng=None, noise=0.0):
    """A 1x1 convolution that copies its input channels (then zeros), plus a little noise."""
    weight = np.zeros((channels_out, channels_in, 1, 1), np.float32)
    for channel in range(min(channels_out, channels_in)):
        weight[channel, channel] = 1.0
    if rng is not None:
        weight += noise * rng.normal(size=weight.shape).astype(np.float32)
    return numpy_helper.from_array(weight, name)


def random_conv(rng, name, channels_out, channels_in, kernel=1):
    return numpy_helper.from_array(rng.normal(size=(channels_out, channels_in, kernel, kernel)).astype(np.float32), name)


def head(nodes, last, initializers):
    """Global pooling then an identity classifier over the channels: the model's output keeps the channels."""
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1, name="logits"),
    ]
    initializers.append(numpy_helper.from_array(np.eye(CHANNELS, dtype=np.float32), "fc_w"))
    return [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CHANNELS])]


def image_input():
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])]


def save_se_model(path, rng):
    """x -> conv + relu -> squeeze-and-excitation (pool, conv, relu, conv, hard-sigmoid: a gate) -> Mul ->
    conv -> residual Add with x -> relu -> head."""
    scalars = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("three", 3), ("six", 6), ("zero", 0))]
    initializers = [identity_conv("c1_w", 8, rng=rng, noise=0.05), random_conv(rng, "se1_w", 2, 8),
                    random_conv(rng, "se2_w", 8, 2), identity_conv("c2_w", CHANNELS, 8, rng, 0.05), *scalars]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "c1_w"], ["c1"], name="c1"),
        helper.make_node("Relu", ["c1"], ["relu1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["relu1"], ["se_pool"], name="se_pool"),
        helper.make_node("Conv", ["se_pool", "se1_w"], ["se1"], name="se1"),
        helper.make_node("Relu", ["se1"], ["se_relu"], name="se_relu"),
        helper.make_node("Conv", ["se_relu", "se2_w"], ["se2"], name="se2"),
        helper.make_node("Add", ["se2", "three"], ["se_shift"], name="se_shift"),
        helper.make_node("Clip", ["se_shift", "zero", "six"], ["se_clip"], name="se_clip"),
        helper.make_node("Div", ["se_clip", "six"], ["gate"], name="gate"),
        helper.make_node("Mul", ["relu1", "gate"], ["excited"], name="excited"),
        helper.make_node("Conv", ["excited", "c2_w"], ["c2"], name="c2"),
        helper.make_node("Add", ["c2", "x"], ["residual"], name="residual"),
        helper.make_node("Relu", ["residual"], ["block"], name="block"),
    ]
    outputs = head(nodes, "block", initializers)
    return save_model(path, nodes, image_input(), outputs, initializers)


def save_inception_model(path, rng):
    """An Inception-style module: a 1x1 branch that keeps the channels, a narrow 1x1 -> 3x3 branch, and a
    max-pool -> narrow 1x1 branch, concatenated; then the head."""
    initializers = [identity_conv("b1_w"), random_conv(rng, "b2a_w", 1, CHANNELS), random_conv(rng, "b2b_w", 2, 1, 3),
                    random_conv(rng, "b3_w", 1, CHANNELS)]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "b1_w"], ["b1"], name="b1"),
        helper.make_node("Relu", ["b1"], ["b1_relu"], name="b1_relu"),
        helper.make_node("Conv", ["x", "b2a_w"], ["b2a"], name="b2a"),
        helper.make_node("Relu", ["b2a"], ["b2a_relu"], name="b2a_relu"),
        helper.make_node("Conv", ["b2a_relu", "b2b_w"], ["b2b"], pads=[1, 1, 1, 1], name="b2b"),
        helper.make_node("Relu", ["b2b"], ["b2b_relu"], name="b2b_relu"),
        helper.make_node("MaxPool", ["x"], ["b3_pool"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="b3_pool"),
        helper.make_node("Conv", ["b3_pool", "b3_w"], ["b3"], name="b3"),
        helper.make_node("Relu", ["b3"], ["b3_relu"], name="b3_relu"),
        helper.make_node("Concat", ["b1_relu", "b2b_relu", "b3_relu"], ["module"], axis=1, name="module"),
        helper.make_node("Conv", ["module", "proj_w"], ["proj"], name="proj"),
        helper.make_node("Relu", ["proj"], ["block"], name="block"),
    ]
    initializers.append(identity_conv("proj_w", CHANNELS, CHANNELS + 3))
    outputs = head(nodes, "block", initializers)
    return save_model(path, nodes, image_input(), outputs, initializers)


def save_skip_mlp(path, rng, dead: bool, depth=5, width=CHANNELS):
    """x (pooled image, CHANNELS values) -> ``depth`` Gemm + Relu layers -> Add with x (a skip from the input
    around them) -> Relu -> output. ``dead``: the chain squeezes everything through the channels' sum (the
    labels are lost along it) and contributes almost nothing at the join; else each layer copies its input,
    a healthy residual branch."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["xp"], name="xp"),
             helper.make_node("Flatten", ["xp"], ["flat"], name="flat")]  # fmt: skip
    initializers, last = [], "flat"
    for index in range(depth):
        scale = 0.01 if index == depth - 1 else 1.0  # the last layer's share at the join
        if dead:  # the sum of the channels, the same for every class: the labels are gone from here on
            weight = scale * np.outer(rng.uniform(0.5, 1, width), np.ones(width)).astype(np.float32)
        else:
            weight = scale * np.eye(width, dtype=np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes += [helper.make_node("Gemm", [last, f"w{index}"], [f"fc{index}"], transB=1, name=f"fc{index}"),
                  helper.make_node("Relu", [f"fc{index}"], [f"layer{index}"], name=f"layer{index}")]  # fmt: skip
        last = f"layer{index}"
    nodes += [helper.make_node("Add", [last, "flat"], ["join"], name="join"),
              helper.make_node("Relu", ["join"], ["out"], name="out")]  # fmt: skip
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", width])]
    return save_model(path, nodes, image_input(), outputs, initializers)


def probe(path, rng):
    x, y = images(rng)
    source = OnnxSource(path, device="cpu")
    report = probecore.run_probes(source, probecore.split_dataset(x, y, seed=0), probecore.RunSpec(fit=probecore.FitOptions(l2=1e-3)))
    return source, report


@pytest.mark.parametrize("build", [save_se_model, save_inception_model], ids=["squeeze-excitation", "inception"])
def test_healthy_branchy_models_have_no_findings_with_the_default_layers(tmp_path, rng, build):
    source, report = probe(build(tmp_path / "m.onnx", rng), rng)
    assert [finding.message for finding in report.diagnostics] == []
    roles = {layer.name: layer.role for layer in report.layers}
    assert roles["x"] == roles["block"] == "main"
    if build is save_se_model:  # the gate is a side branch, probed only when asked for
        assert not {"se_pool", "se_relu", "gate"} & set(roles)
        assert {layer.name: layer.role for layer in source.layers()}["gate"] == "side"
    else:  # the narrow branches read worse than the module's input, as parts of it do; nothing to flag
        errors = {layer.name: layer.metrics["test"].error for layer in report.layers}
        assert errors["b2b_relu"] > errors["x"] + 0.1 and roles["b2b_relu"] == "branch"
        assert {"b1_relu", "b2a_relu", "b2b_relu", "b3_relu", "b3_pool"} <= set(roles)
        as_a_chain = probecore.diagnose([layer.name for layer in report.layers], [layer.metrics for layer in report.layers])
        assert {finding.kind for finding in as_a_chain} == {"non_monotonic"}  # what reading it as a list claimed


def test_a_dead_chain_that_a_skip_goes_around_is_flagged_and_a_healthy_one_is_not(tmp_path, rng):
    _, dead = probe(save_skip_mlp(tmp_path / "dead.onnx", rng, dead=True), rng)
    errors = {layer.name: layer.metrics["test"].error for layer in dead.layers}
    assert min(errors[f"layer{i}"] for i in range(5)) > errors["x"] + 0.2  # the chain lost the labels
    assert [(f.kind, f.layers) for f in dead.diagnostics] == [
        ("dead_segment", ("layer0", "layer1", "layer2", "layer3", "layer4"))
    ]
    assert {layer.name: layer.parents for layer in dead.layers}["join"] == ["layer4", "xp"]  # the skip from the pooled input
    _, healthy = probe(save_skip_mlp(tmp_path / "healthy.onnx", rng, dead=False), rng)
    assert healthy.diagnostics == []
