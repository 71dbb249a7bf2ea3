"""The ONNX backend: loading and validation, layer discovery, exposing outputs, batched activations."""

import numpy as np
import onnx
import pytest
from onnx_models import mlp_reference, mlp_weights, save_convnet, save_mlp, save_model
from onnx import TensorProto, helper

import probecore
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
    # the input, activations, pooling, a residual Add (not the bias Add), swish (not the sigmoid inside it), the output
    assert defaults == {"x", "relu", "block", "swish", "pool", "logits"}
    assert layers["swish"].op_type == "Swish" and layers["gate"].op_type == "Sigmoid"


def test_exposing_outputs_leaves_the_callers_model_untouched(tmp_path, rng):
    model = onnx_graph.load_outline(save_convnet(tmp_path / "c.onnx", rng))
    before = model.SerializeToString()
    exposed = onnx.load_from_string(onnx_graph.with_outputs(model, ["relu", "pool", "logits"]))
    assert model.SerializeToString() == before
    assert [value.name for value in exposed.graph.output] == ["relu", "pool", "logits"]


def test_exposing_outputs_leaves_out_the_nodes_they_do_not_need(tmp_path, rng):
    # onnxruntime runs every node of a graph, fetched or not: probing early layers must not run the rest
    model = onnx_graph.load_outline(save_convnet(tmp_path / "c.onnx", rng))
    exposed = onnx.load_from_string(onnx_graph.with_outputs(model, ["relu"]))
    assert [node.output[0] for node in exposed.graph.node] == ["conv", "relu"]
    assert [value.name for value in exposed.graph.output] == ["relu"]
    assert len(model.graph.node) > 2 and model.graph.output[0].name == "logits"


def test_reduction_nodes_follow_the_graph_deepest_layer_first(tmp_path, rng):
    # onnxruntime walks back from the last leaf node: this order runs each pooling node as soon as its layer
    # exists, so no full activation is held to the end of the run (benchmarks/README.md, peak RSS)
    model = onnx_graph.load_outline(save_convnet(tmp_path / "c.onnx", rng))
    n_nodes = len(model.graph.node)
    policy = probecore.ReductionPolicy(max_features=8)
    reductions = {name: probecore.plan_reduction(name, (4, 8, 8), policy) for name in ("relu", "block", "swish")}
    exposed = onnx.load_from_string(onnx_graph.with_outputs(model, [], reductions))
    assert len(model.graph.node) == n_nodes  # the caller's model is left as it was
    own = [node.output[0] for node in model.graph.node]
    kept = own[: own.index("swish") + 1]  # what the deepest probed layer needs; the rest is left out
    assert [node.output[0] for node in exposed.graph.node[: len(kept)]] == kept
    added = [node.output[0] for node in exposed.graph.node[len(kept) :]]
    tails = [name for name in added if name.endswith("::probe")]
    assert tails == ["swish::probe", "block::probe", "relu::probe"] and len(added) > len(tails)


def test_the_source_keeps_an_outline_of_the_model_not_its_weights(tmp_path, rng):
    weights = mlp_weights(rng, n_in=64, n_hidden=512)  # 130 KB of weights
    path = save_mlp(tmp_path / "mlp.onnx", weights)
    outline = onnx_graph.load_outline(path)
    assert outline.ByteSize() < path.stat().st_size / 20
    assert [init.dims for init in outline.graph.initializer] == [list(w.shape) for w in weights.values()]
    source = OnnxSource(path)
    assert {layer.name: layer.shape for layer in source.layers()}["hidden"] == (512,)
    x = rng.normal(size=(7, 64)).astype(np.float32)
    (batch,) = source.activations(x, ["hidden"], batch_size=8)  # weights read from the file for the session
    np.testing.assert_allclose(batch["hidden"], mlp_reference(x, weights)[1], rtol=1e-4, atol=1e-4)


def test_a_model_file_replaced_while_probing_is_refused(tmp_path, rng):
    path = save_mlp(tmp_path / "mlp.onnx", mlp_weights(rng))
    source = OnnxSource(path)
    save_mlp(path, mlp_weights(rng))  # other weights under the same name, as a training job might write
    with pytest.raises(ModelError, match="mlp.onnx changed while it was being probed"):
        next(source.activations(np.zeros((2, 12), np.float32), ["hidden"], batch_size=8))


def test_invalid_weights_are_caught_by_the_check(tmp_path, rng):
    weights = mlp_weights(rng)
    path = save_mlp(tmp_path / "mlp.onnx", weights)
    model = onnx.load(str(path))
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-8]  # two floats short
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="mlp.onnx is not a valid ONNX model"):
        OnnxSource(path)


def test_input_checks_cast_what_is_safe_and_name_what_does_not_fit(tmp_path, rng):
    source = OnnxSource(save_convnet(tmp_path / "c.onnx", rng))
    as_bytes = rng.integers(0, 255, size=(2, 3, 8, 8), dtype=np.uint8)
    assert source.check_inputs(as_bytes) is as_bytes  # cast batch by batch as it is fed, never held whole
    (fed,) = source.activations(as_bytes, ["relu"], batch_size=8)
    (cast,) = source.activations(as_bytes.astype(np.float32), ["relu"], batch_size=8)
    np.testing.assert_array_equal(fed["relu"], cast["relu"])
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


def _two_input_model(tmp_path):
    nodes = [helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["a", "b_float"], ["sum"]), helper.make_node("Relu", ["sum"], ["relu"])]  # fmt: skip
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 4])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["N", 4])]
    return save_model(tmp_path / "two.onnx", nodes, inputs, outputs, [])


def test_models_with_several_inputs_take_a_structured_array_with_a_field_per_input(tmp_path, rng):
    source = OnnxSource(_two_input_model(tmp_path))
    a = rng.normal(size=(7, 4)).astype(np.float32)
    b = rng.integers(-3, 3, size=(7, 4))
    x = probecore.pack_inputs(a=a, b=b)
    assert x.shape == (7,)
    batches = list(source.activations(source.check_inputs(x), ["a", "b", "relu"], batch_size=3))
    joined = {name: np.concatenate([batch[name] for batch in batches]) for name in ("a", "b", "relu")}
    np.testing.assert_array_equal(joined["a"], a)
    np.testing.assert_array_equal(joined["b"], b)
    np.testing.assert_allclose(joined["relu"], np.maximum(a.astype(np.float64) + b, 0), rtol=1e-6)


def test_several_inputs_without_a_field_for_each_are_refused_naming_them(tmp_path, rng):
    source = OnnxSource(_two_input_model(tmp_path))
    with pytest.raises(DataError, match=r"2 inputs \(a, b\).*no field for a, b; pass x as a structured array"):
        source.check_inputs(rng.normal(size=(5, 4)).astype(np.float32))
    with pytest.raises(DataError, match="no field for b"):
        source.check_inputs(probecore.pack_inputs(a=rng.normal(size=(5, 4))))
    with pytest.raises(DataError, match=r"model input 'b' expects \(4\)"):
        source.check_inputs(probecore.pack_inputs(a=np.zeros((5, 4)), b=np.zeros((5, 3), np.int64)))
    with pytest.raises(DataError, match="same number of samples"):
        probecore.pack_inputs(a=np.zeros((5, 4)), b=np.zeros((4, 4)))


def test_cpu_session_creation_is_quiet(tmp_path, rng, capfd):
    model = onnx_graph.read_model(save_mlp(tmp_path / "mlp.onnx", mlp_weights(rng)))
    session, provider = create_session(model.SerializeToString(), "auto")
    assert provider in session.get_providers()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_asking_for_cuda_where_it_cannot_work_is_a_clear_error(tmp_path, rng):
    import onnxruntime

    model = onnx_graph.read_model(save_mlp(tmp_path / "mlp.onnx", mlp_weights(rng)))
    try:
        _, provider = create_session(model.SerializeToString(), "auto")
    except ModelError:
        provider = None
    if provider == "CUDAExecutionProvider":
        pytest.skip(f"CUDA works here (onnxruntime {onnxruntime.__version__})")
    with pytest.raises(ModelError, match="--device cuda was asked for"):
        create_session(model.SerializeToString(), "cuda")


def test_leaving_out_unneeded_nodes_keeps_what_a_subgraph_reads_from_outside(tmp_path, rng):
    # an If node whose branches read `r` from the enclosing graph: `r` has no edge to the If node itself
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    branch_out = helper.make_tensor_value_info("branch", TensorProto.FLOAT, ["N", 4])
    then_graph = helper.make_graph([helper.make_node("Identity", ["r"], ["branch"])], "then", [], [branch_out])
    else_graph = helper.make_graph([helper.make_node("Neg", ["r"], ["branch"])], "else", [], [branch_out])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Sigmoid", ["x"], ["unused"]),
    ]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in ("y", "unused")]
    model = onnx.load(str(save_model(tmp_path / "if.onnx", nodes, [x], outputs, [zero])))
    exposed = onnx.load_from_string(onnx_graph.with_outputs(model, ["y"]))
    assert [node.output[0] for node in exposed.graph.node] == ["r", "total", "positive", "y"]
    session = create_session(exposed.SerializeToString())[0]
    values = rng.normal(size=(3, 4)).astype(np.float32)
    expected = np.maximum(values, 0) * (1 if values.sum() > 0 else -1)
    np.testing.assert_allclose(session.run(["y"], {"x": values})[0], expected, rtol=1e-6)


def test_inputs_of_any_numeric_dtype_are_layers_and_images_among_them_default_ones(tmp_path, rng):
    # a uint8 image input (the model casts and scales it itself) is the raw-input baseline like a float one;
    # int64 token ids are listed and selectable but not a default pick
    nodes = [
        helper.make_node("Cast", ["img"], ["imgf"], to=TensorProto.FLOAT),
        helper.make_node("GlobalAveragePool", ["imgf"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["flat", "idsf"], ["logits"], axis=1),
    ]
    inputs = [helper.make_tensor_value_info("img", TensorProto.UINT8, ["N", 3, 8, 8]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8])]
    source = OnnxSource(save_model(tmp_path / "u8.onnx", nodes, inputs, outputs, []), device="cpu")
    layers = {layer.name: layer for layer in source.layers()}
    assert layers["img"].op_type == "Input" and layers["img"].default and layers["img"].shape == (3, 8, 8)
    assert layers["ids"].op_type == "Input" and not layers["ids"].default

    img = rng.integers(0, 255, (90, 3, 8, 8), dtype=np.uint8)
    ids = rng.integers(0, 100, (90, 5))
    y = (img[:, 0].mean(axis=(1, 2)) > 127).astype(np.int64)
    dataset = probecore.split_dataset(probecore.pack_inputs(img=img, ids=ids), y)
    report = probecore.run_probes(source, dataset, probecore.RunSpec(layers=["img", "ids"], fit=probecore.FitOptions(l2=1e-2)))
    assert [layer.name for layer in report.layers] == ["img", "ids"]
    assert report.layers[0].reduction["features_out"] == 192 and report.layers[1].reduction["features_out"] == 5
