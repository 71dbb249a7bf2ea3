"""Models exported with open input sizes (``[N, 3, H, W]``, as detectors, OCR, Paddle and TF models often are):
the sizes are fixed from the data, and such a model is planned, reduced in the graph and cached exactly as
the same model exported with those sizes."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_open_convnet
from test_cli import invoke

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.errors import DataError


def images(rng, n=240, size=32):
    x = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + 2 * (x[:, 1].mean(axis=(1, 2)) > 0)
    return x, y


def probe_with_cache(path, dataset, cache):
    source = OnnxSource(path, device="cpu")
    report = probecore.run_probes(source, dataset, probecore.RunSpec(fit=probecore.FitOptions(l2=1e-2), cache_dir=cache))
    return source, report


@pytest.mark.parametrize("open_dims", [("H", "W"), (None, None), ("s0", 32)], ids=["named", "unnamed", "one-open"])
def test_open_input_sizes_are_fixed_from_the_data_and_probed_as_a_fixed_model(tmp_path, rng, open_dims):
    x, y = images(rng)
    dataset = probecore.split_dataset(x, y, seed=0)
    weights_rng = np.random.default_rng(7)
    open_model = save_open_convnet(tmp_path / "open.onnx", weights_rng, *open_dims)
    fixed_model = save_open_convnet(tmp_path / "fixed.onnx", np.random.default_rng(7), 32, 32)

    assert OnnxSource(open_model).layers()[1].shape == (8, None, None) or open_dims[1] == 32
    fixed_source, fixed = probe_with_cache(fixed_model, dataset, tmp_path / "fixed-cache")
    cache = tmp_path / "cache"
    open_source, first = probe_with_cache(open_model, dataset, cache)

    assert open_source.bytes_fetched == fixed_source.bytes_fetched > 0
    assert first.settings["reduced_by_source"] and first.settings["cache"]["splits_from_cache"] == 0
    assert first.settings["source"]["input_shapes_from_data"] == {"x": [3, 32, 32]}
    assert [layer.reduction for layer in first.layers] == [layer.reduction for layer in fixed.layers]
    assert first.layers[1].reduction["description"] == "avgpool 2x2"  # relu1, 8x32x32, pooled in the graph
    for ours, theirs in zip(first.layers, fixed.layers):
        assert ours.metrics["test"].loss == pytest.approx(theirs.metrics["test"].loss, rel=1e-5)

    rerun_source, rerun = probe_with_cache(open_model, dataset, cache)
    assert rerun_source.bytes_fetched == 0 and rerun.settings["cache"]["splits_from_cache"] == 3
    assert [layer.metrics["test"].loss for layer in rerun.layers] == [layer.metrics["test"].loss for layer in first.layers]


def test_another_size_on_the_same_source_is_planned_for_that_size(tmp_path, rng):
    source = OnnxSource(save_open_convnet(tmp_path / "open.onnx", rng), device="cpu")
    for size, pooled in ((32, "avgpool 2x2"), (16, "none")):
        x, y = images(rng, n=120, size=size)
        spec = probecore.RunSpec(layers=["relu1"], fit=probecore.FitOptions(l2=1e-2))
        report = probecore.run_probes(source, probecore.split_dataset(x, y), spec)
        assert report.layers[0].shape == (8, size, size) and report.layers[0].reduction["description"] == pooled


def test_splits_of_different_sizes_are_refused_in_one_line(tmp_path, rng):
    source = OnnxSource(save_open_convnet(tmp_path / "open.onnx", rng), device="cpu")
    (x_train, y_train), (x_test, y_test) = images(rng, n=100, size=32), images(rng, n=40, size=24)
    dataset = probecore.datasets.dataset_from_splits({"train": x_train, "test": x_test}, {"train": y_train, "test": y_test})
    with pytest.raises(DataError, match=r"the splits' samples differ in shape \(train \(3, 32, 32\), valid \(3, 32, 32\), "
                                        r"test \(3, 24, 24\)\); give every split samples of one shape"):
        probecore.run_probes(source, dataset)


def save_with_untypeable_layer(path, rng):
    """x (N, 3, H, W) -> Conv -> com.microsoft Gelu (an onnxruntime op that ONNX's shape inference does not know,
    as in models optimized by onnxruntime's transformer tools) -> GlobalAveragePool -> Flatten -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Gelu", ["conv"], ["gelu"], name="gelu", domain="com.microsoft"),
        helper.make_node("GlobalAveragePool", ["gelu"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1, name="logits"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    initializers = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w"),
                    numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "fc_w")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_layer_no_inference_can_type_is_measured_on_one_sample_then_reduced_in_graph_and_cached(tmp_path, rng):
    path = save_with_untypeable_layer(tmp_path / "ms.onnx", rng)
    assert {layer.name: layer.shape for layer in OnnxSource(path).layers()}["gelu"] is None
    x, y = images(rng, n=160)
    dataset = probecore.split_dataset(x, y)
    cache = tmp_path / "cache"
    source, first = probe_with_cache(path, dataset, cache)
    gelu = {layer.name: layer for layer in first.layers}["gelu"]
    assert gelu.shape == (8, 32, 32) and gelu.reduction["description"] == "avgpool 2x2"
    assert first.settings["reduced_by_source"] and first.settings["cache"] is not None
    rerun_source, rerun = probe_with_cache(path, dataset, cache)
    assert rerun.settings["cache"]["splits_from_cache"] == 3
    assert rerun_source.bytes_fetched <= 8 * 32 * 32 * 4 + 3 * 8 * 4 + 4 * 4  # the one measured sample, no more


def test_an_image_folder_fixes_an_open_model_to_the_crop_size_and_says_so(tmp_path, rng):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(12):
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{index}.png")
    model = save_open_convnet(tmp_path / "open.onnx", rng)
    result = invoke("run", model, "--data", tmp_path / "images", "--out", tmp_path / "r", "--image-size", "24")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["settings"]["source"]["input_shapes_from_data"] == {"x": [3, 24, 24]}
    assert report["settings"]["reduced_by_source"] and report["settings"]["cache"] is not None
    default = invoke("run", model, "--data", tmp_path / "images", "--out", tmp_path / "r2", "--layers", "gap")
    assert default.exit_code == 0, default.output
    assert "model input 'x' takes any image size: images are cropped to 224x224 (--image-size to change)" in default.stdout
