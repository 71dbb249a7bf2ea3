"""Models that keep their weights in external data files (``model.onnx`` + ``model.onnx.data``, what torch's
exporter writes by default): probed like any other, hashed whole (new weights under the same .onnx are a new
model for the cache), and a missing or short weights file is named with where it was looked for."""

import json

import numpy as np
import pytest
from onnx_models import save_open_convnet
from test_cli import invoke

from probecore.backends.onnx_source import OnnxSource
from probecore.errors import ModelError


@pytest.fixture
def data(tmp_path, rng):
    x = rng.normal(size=(200, 3, 16, 16)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return tmp_path / "d.npz"


def run(model, data, out, *extra):
    result = invoke("run", model, "--data", data, "--out", out, "--l2", "1e-2", *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def test_external_weights_probe_as_inline_ones_and_new_weights_are_a_new_model(tmp_path, data):
    external = save_open_convnet(tmp_path / "model.onnx", np.random.default_rng(3), external_data=True)
    inline = save_open_convnet(tmp_path / "inline.onnx", np.random.default_rng(3))
    assert (tmp_path / "model.onnx.data").stat().st_size > 4 * 8 * 3 * 3 * 3

    first = run(external, data, tmp_path / "r1")
    assert first["settings"]["source"]["external_data"] == ["model.onnx.data"]
    assert first["settings"]["reduced_by_source"] and first["settings"]["cache"]["splits_from_cache"] == 0
    same = run(inline, data, tmp_path / "r0", "--no-cache")
    assert [layer["metrics"] for layer in first["layers"]] == [layer["metrics"] for layer in same["layers"]]

    weights = np.fromfile(tmp_path / "model.onnx.data", np.float32)
    (-weights).tofile(tmp_path / "model.onnx.data")  # new weights, the .onnx file untouched
    second = run(external, data, tmp_path / "r2")
    assert second["settings"]["source"]["model_sha256"] != first["settings"]["source"]["model_sha256"]
    assert second["settings"]["cache"]["splits_from_cache"] == 0 and second["settings"]["source"]["bytes_fetched"] > 0
    assert second["layers"][-1]["metrics"] != first["layers"][-1]["metrics"]
    third = run(external, data, tmp_path / "r3")
    assert third["settings"]["cache"]["splits_from_cache"] == 3 and third["settings"]["source"]["bytes_fetched"] == 0


def test_a_missing_weights_file_is_named_with_where_it_was_looked_for(tmp_path, data):
    model = save_open_convnet(tmp_path / "model.onnx", np.random.default_rng(3), external_data=True)
    (tmp_path / "model.onnx.data").unlink()
    out, cache = tmp_path / "results", tmp_path / "cache"
    result = invoke("run", model, "--data", data, "--out", out, "--cache-dir", cache)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == (
        f"error: model.onnx keeps its weights in model.onnx.data, which is missing: looked for "
        f"{tmp_path / 'model.onnx.data'}; put that file beside model.onnx (or re-export the model with its weights inside)\n"
    )
    assert not out.exists() and not cache.exists()


def test_a_short_weights_file_is_named(tmp_path):
    model = save_open_convnet(tmp_path / "model.onnx", np.random.default_rng(3), external_data=True)
    weights = tmp_path / "model.onnx.data"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-16])
    with pytest.raises(ModelError) as caught:
        OnnxSource(model)
    assert str(caught.value) == (
        f"{weights} is shorter than model.onnx expects ({len(whole) - 16} bytes, weights up to byte {len(whole)}); "
        "copy it again whole, or re-export the model"
    )


def test_weights_replaced_while_probing_are_refused(tmp_path, rng):
    model = save_open_convnet(tmp_path / "model.onnx", np.random.default_rng(3), external_data=True)
    source = OnnxSource(model)
    weights = np.fromfile(tmp_path / "model.onnx.data", np.float32)
    (weights * 2).tofile(tmp_path / "model.onnx.data")
    with pytest.raises(ModelError, match="model.onnx changed while it was being probed"):
        next(source.activations(np.zeros((2, 3, 16, 16), np.float32), ["relu1"], batch_size=8))


def test_torch_default_export_with_dynamic_axes_and_external_data(tmp_path, data):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.act = torch.nn.GELU()
            self.head = torch.nn.Linear(32, 2)

        def forward(self, x):
            return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net, example = Net().eval(), torch.randn(2, 3, 16, 16)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (example,), str(path), dynamo=True, dynamic_shapes={"x": dims})
    assert (tmp_path / "net.onnx.data").is_file()  # torch's default: weights beside the graph

    source = OnnxSource(path, device="cpu")
    gelu = [layer for layer in source.layers() if layer.op_type == "Gelu" and layer.default]
    assert len(gelu) == 1 and gelu[0].shape == (32, None, None)  # GELU written out with Erf: one layer, its output
    x = np.load(data)["x"][:4]
    source.check_inputs(x)
    (batch,) = source.activations(x, [gelu[0].name, "linear"], batch_size=8)
    with torch.no_grad():
        np.testing.assert_allclose(batch[gelu[0].name], net.act(net.conv(torch.from_numpy(x))).numpy(), atol=1e-5)
        np.testing.assert_allclose(batch["linear"], net(torch.from_numpy(x)).numpy(), atol=1e-5)

    first = run(path, data, tmp_path / "r1")
    settings = first["settings"]
    assert settings["source"]["external_data"] == ["net.onnx.data"] and settings["reduced_by_source"]
    assert settings["source"]["input_shapes_from_data"] == {"x": [3, 16, 16]}
    gelu_layer = next(layer for layer in first["layers"] if layer["name"] == gelu[0].name)
    assert gelu_layer["shape"] == [32, 16, 16] and gelu_layer["reduction"]["description"] == "avgpool 2x2"
    again = run(path, data, tmp_path / "r2")
    assert again["settings"]["source"]["bytes_fetched"] == 0 and again["settings"]["cache"]["splits_from_cache"] == 3
    # the fits read the cache's read-only memory map above; held in memory instead, the same probes
    held = run(path, data, tmp_path / "r3", "--no-cache")
    assert [layer["name"] for layer in held["layers"]] == [layer["name"] for layer in first["layers"]]
    for cached, in_memory in zip(first["layers"], held["layers"]):
        assert in_memory["fit"]["iterations"] == cached["fit"]["iterations"]
        assert in_memory["metrics"] == cached["metrics"]
