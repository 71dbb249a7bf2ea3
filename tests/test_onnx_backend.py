"""The ONNX backend: loading and validation, layer discovery, exposing outputs, batched activations."""

import numpy as np
import onnx
import pytest
from onnx_models import mlp_reference, mlp_weights, save_convnet, save_mlp, save_model
from onnx import TensorProto, helper

from probecore.backends import onnx_graph
from probecore.backends.onnx_source import OnnxSource, create_session
from probecore.errors import DataError, ModelError


def test_activations_match_a_float64_reference_across_uneven_batches(tmp_path, rng):
    weights = mlp_weights(rng)
    source = OnnxSource(save_mlp(tmp_path / "mlp.onnx", weights))
    x = rng.normal(size=(23, 12)).astype(np.float32)
    batches = list(source.activations(x, ["x", "fc1", "hidden", "logits"], batch_size=5))
    assert [len(batch["hidden"]) for batch in batches] == [5, 5, 5, 5, 3]
    joined = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    pre, hidden, logits = mlp_reference(x, weights)
    np.testing.assert_array_equal(joined["x"], x)
    np.testing.assert_allclose(joined["fc1"], pre, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(joined["hidden"], hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(joined["logits"], logits, rtol=1e-4, atol=1e-4)


def test_model_with_a_fixed_batch_size_is_fed_padded_batches(tmp_path, rng):
    weights = mlp_weights(rng)
    source = OnnxSource(save_mlp(tmp_path / "fixed.onnx", weights, batch_dim=4))
    x = rng.normal(size=(10, 12)).astype(np.float32)
    batches = list(source.activations(x, ["hidden"], batch_size=256))
    hidden = np.concatenate([batch["hidden"] for batch in batches])
    assert [len(batch["hidden"]) for batch in batches] == [4, 4, 2]
    np.testing.assert_allclose(hidden, mlp_reference(x, weights)[1], rtol=1e-4, atol=1e-4)


def test_layers_are_listed_in_graph_order_with_shapes_and_default_picks(tmp_path, rng):
    layers = {layer.name: layer for layer in OnnxSource(save_convnet(tmp_path / "c.onnx", rng)).layers()}
    assert list(layers) == ["x", "conv", "relu", "conv2", "block", "biased", "gate", "swish", "pool", "flat", "logits"]
    assert layers["conv"].shape == (4, 8, 8) and layers["conv"].n_features == 256
    assert layers["pool"].shape == (4, 4, 4)
    assert layers["logits"].is_output and not layers["relu"].is_output
    defaults = {name for name, layer in layers.items() if layer.default}
    # the input, activations, pooling, a residual Add (not the bias Add), swish, and the output
    assert defaults == {"x", "relu", "block", "gate", "swish", "pool", "logits"}


def test_exposing_outputs_leaves_the_callers_model_untouched(tmp_path, rng):
    model = onnx_graph.load_model(save_convnet(tmp_path / "c.onnx", rng))
    before = model.SerializeToString()
    exposed = onnx.load_from_string(onnx_graph.with_outputs(model, ["relu", "pool", "logits"]))
    assert model.SerializeToString() == before
    assert [value.name for value in exposed.graph.output] == ["logits", "relu", "pool"]


def test_input_checks_cast_what_is_safe_and_name_what_does_not_fit(tmp_path, rng):
    source = OnnxSource(save_convnet(tmp_path / "c.onnx", rng))
    as_bytes = rng.integers(0, 255, size=(2, 3, 8, 8), dtype=np.uint8)
    assert source.check_inputs(as_bytes).dtype == np.float32
    with pytest.raises(DataError, match=r"per-sample shape \(192,\).*expects \(3, 8, 8\)"):
        source.check_inputs(np.zeros((2, 192), np.float32))
    with pytest.raises(DataError, match="dtype <U1"):
        source.check_inputs(np.full((2, 3, 8, 8), "a"))
    poisoned = np.zeros((3, 3, 8, 8), np.float32)
    poisoned[1, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="1 input samples contain NaN or Inf"):
        source.check_inputs(poisoned)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"definitely not a protobuf \xff\xfe", "is not an ONNX model"),
        (b"", "is not an ONNX model"),
    ],
)
def test_files_that_are_not_onnx_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        OnnxSource(path)


def test_truncated_and_missing_models_are_refused(tmp_path, rng):
    whole = save_mlp(tmp_path / "mlp.onnx", mlp_weights(rng)).read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelError, match="truncated.onnx"):
        OnnxSource(truncated)
    with pytest.raises(ModelError, match="model file not found"):
        OnnxSource(tmp_path / "missing.onnx")


def test_models_with_several_inputs_are_refused_naming_them(tmp_path):
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in ("a", "b")]
    outputs = [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 4])]
    path = save_model(tmp_path / "two.onnx", nodes, inputs, outputs, [])
    with pytest.raises(ModelError, match=r"2 inputs \(a, b\)"):
        OnnxSource(path)


def test_cpu_session_creation_is_quiet(tmp_path, rng, capfd):
    model = onnx_graph.load_model(save_mlp(tmp_path / "mlp.onnx", mlp_weights(rng)))
    session, provider = create_session(model.SerializeToString(), "auto")
    assert provider in session.get_providers()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_asking_for_cuda_where_it_cannot_work_is_a_clear_error(tmp_path, rng):
    import onnxruntime

    model = onnx_graph.load_model(save_mlp(tmp_path / "mlp.onnx", mlp_weights(rng)))
    try:
        _, provider = create_session(model.SerializeToString(), "auto")
    except ModelError:
        provider = None
    if provider == "CUDAExecutionProvider":
        pytest.skip(f"CUDA works here (onnxruntime {onnxruntime.__version__})")
    with pytest.raises(ModelError, match="--device cuda was asked for"):
        create_session(model.SerializeToString(), "cuda")
