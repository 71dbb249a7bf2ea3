"""A ResNet-50-shaped ONNX model with random weights, built inline with ``onnx.helper`` (opset 17).

The layout of torchvision's ``resnet50`` with every BatchNorm folded into its conv (so each conv has a
bias): stem conv 7x7/2 to 64 channels + Relu + MaxPool 3x3/2; four stages of [3, 4, 6, 3] bottleneck blocks
of widths 64/128/256/512 and expansion 4 (1x1 reduce, 3x3 with stride 2 in the first block of stages 2-4,
1x1 expand; a 1x1 projection shortcut in the first block of every stage), each block ending in Add + Relu;
GlobalAveragePool, Flatten, Gemm to 1000 classes. 25.6 M parameters, about 100 MB as float32.

Weights are He-scaled normals (std sqrt(2 / fan_in)), biases small normals, drawn from ``seed``; the batch
axis is dynamic. Readable tensor names: ``stem`` (after the max pool), ``layer1.0`` ... ``layer4.2`` (each
block's final Relu, 16 in all), ``pool`` (global average pool), ``logits``; the inner tensors are
``layer2.0.conv1``, ``layer2.0.relu1``, ..., ``layer2.0.downsample``, ``layer2.0.add``. The classifier's
weights are the initializers ``fc.weight`` (1000, 2048) and ``fc.bias``.

``python benchmarks/resnet50.py OUT.onnx [IMAGE_SIZE]`` writes one and checks that onnxruntime runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (width, blocks); a block outputs width * EXPANSION channels
EXPANSION = 4
N_CLASSES = 1000
INPUT = "images"
OUTPUT = "logits"
BLOCK_OUTPUTS = tuple(f"layer{stage}.{block}" for stage, (_, n) in enumerate(STAGES, start=1) for block in range(n))


def block_shapes(image_size: int = 224) -> dict[str, tuple[int, int, int]]:
    """Per-sample (C, H, W) of every block output, for an input of ``image_size`` pixels square."""
    side = _after(_after(image_size, 7, 2, 3), 3, 2, 1)  # stem conv, then max pool
    shapes = {}
    for stage, (width, blocks) in enumerate(STAGES, start=1):
        if stage > 1:
            side = _after(side, 3, 2, 1)
        for block in range(blocks):
            shapes[f"layer{stage}.{block}"] = (width * EXPANSION, side, side)
    return shapes


def build_resnet50(path, batch_dim: str = "N", image_size: int = 224, seed: int = 0) -> Path:
    """Write the model to ``path`` (checked with ``onnx.checker``) and return the path."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def conv(name, x, c_in, c_out, kernel, stride=1):
        weight = rng.standard_normal((c_out, c_in, kernel, kernel), dtype=np.float32)
        weight *= np.float32(np.sqrt(2.0 / (c_in * kernel * kernel)))
        bias = (0.01 * rng.standard_normal(c_out, dtype=np.float32)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"{name}.weight"))
        initializers.append(numpy_helper.from_array(bias, f"{name}.bias"))
        pad = kernel // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [name],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        return name

    def relu(x, out):
        nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    current = relu(conv("stem.conv", INPUT, 3, 64, 7, 2), "stem.relu")
    nodes.append(
        helper.make_node("MaxPool", [current], ["stem"], name="stem", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    )
    current, channels = "stem", 64
    for stage, (width, blocks) in enumerate(STAGES, start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            out_channels = width * EXPANSION
            branch = relu(conv(f"{prefix}.conv1", current, channels, width, 1), f"{prefix}.relu1")
            branch = relu(conv(f"{prefix}.conv2", branch, width, width, 3, stride), f"{prefix}.relu2")
            branch = conv(f"{prefix}.conv3", branch, width, out_channels, 1)
            shortcut = current
            if block == 0:
                shortcut = conv(f"{prefix}.downsample", current, channels, out_channels, 1, stride)
            nodes.append(helper.make_node("Add", [branch, shortcut], [f"{prefix}.add"], name=f"{prefix}.add"))
            current, channels = relu(f"{prefix}.add", prefix), out_channels
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["pool.flat"], name="flatten"))
    fc = rng.standard_normal((N_CLASSES, channels), dtype=np.float32) * np.float32(np.sqrt(1.0 / channels))
    initializers.append(numpy_helper.from_array(fc, "fc.weight"))
    initializers.append(numpy_helper.from_array(np.zeros(N_CLASSES, np.float32), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["pool.flat", "fc.weight", "fc.bias"], [OUTPUT], name="fc", transB=1))

    graph = helper.make_graph(
        nodes,
        "resnet50_random",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch_dim, 3, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch_dim, N_CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="probecore-benchmarks")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def classifier(path) -> tuple[np.ndarray, np.ndarray]:
    """``fc.weight`` (1000, 2048) and ``fc.bias`` of a model written by ``build_resnet50``."""
    found = {init.name: init for init in onnx.load(str(path)).graph.initializer if init.name.startswith("fc.")}
    return numpy_helper.to_array(found["fc.weight"]), numpy_helper.to_array(found["fc.bias"])


def _after(side: int, kernel: int, stride: int, pad: int) -> int:
    return (side + 2 * pad - kernel) // stride + 1


def _check_runs(path, image_size: int) -> None:
    import onnxruntime as ort

    names = ["stem", *BLOCK_OUTPUTS, "pool", OUTPUT]
    model = onnx.load(str(path))
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names[:-1])  # expose the inner ones
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, image_size, image_size), dtype=np.float32)
    values = dict(zip(names, session.run(names, {INPUT: x})))
    expected = block_shapes(image_size)
    for name, value in values.items():
        assert np.isfinite(value).all(), name
        if name in expected:
            assert value.shape == (2, *expected[name]), (name, value.shape)
        print(f"{name:10s} {tuple(value.shape)}  mean |x| {np.abs(value).mean():.3g}")
    assert values[OUTPUT].shape == (2, N_CLASSES)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "resnet50.onnx")
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    build_resnet50(out, image_size=size)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    _check_runs(out, size)
