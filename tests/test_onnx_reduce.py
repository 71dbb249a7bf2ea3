"""In-graph reductions give the same features as the host kernels, and only reduced features leave onnxruntime."""

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_models import save_convnet, save_model, save_open_convnet

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.bundled import DEMO_DATA, DEMO_MODEL


def save_relu(path, sample_shape, elem_type=TensorProto.FLOAT):
    """x -> Relu "act" -> Identity "out", for any per-sample shape and float type."""
    nodes = [helper.make_node("Relu", ["x"], ["act"]), helper.make_node("Identity", ["act"], ["out"])]
    inputs = [helper.make_tensor_value_info("x", elem_type, ["N", *sample_shape])]
    outputs = [helper.make_tensor_value_info("out", elem_type, ["N", *sample_shape])]
    return save_model(path, nodes, inputs, outputs, [])


CASES = [
    # per-sample shape, policy
    ((6, 9, 7), dict(max_features=60)),  # avg, window 3 leaving edge tiles
    ((6, 9, 7), dict(max_features=60, pool="max")),
    ((6, 8, 8), dict(max_features=100)),  # window dividing the map
    ((6, 9, 7), dict(max_features=60, global_pool=True)),
    ((5, 11, 4), dict(max_features=40, pool="max", global_pool=True)),
    ((9, 7, 6), dict(max_features=60, channels_last=True)),
    ((9, 7, 6), dict(max_features=60, channels_last=True, pool="max")),
    ((30, 8), dict(max_features=20)),  # sequence pooled over time
    ((30, 8), dict(max_features=20, pool="max")),
    ((30, 40), dict(max_features=25)),  # sequence pooled, then a subset
    ((500,), dict(max_features=64)),  # flat: subset only
    ((64, 3, 3), dict(max_features=20)),  # channels alone exceed the limit: global pool, then subset
    ((4, 3, 3), dict(max_features=100)),  # small enough: no reduction
]


@pytest.mark.parametrize("sample_shape, policy", CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_in_graph_reduction_equals_the_host_kernels(tmp_path, rng, sample_shape, policy):
    source = OnnxSource(save_relu(tmp_path / "m.onnx", sample_shape))
    reduction = probecore.plan_reduction("act", sample_shape, probecore.ReductionPolicy(seed=7, **policy))
    x = rng.normal(size=(21, *sample_shape)).astype(np.float32)
    host = np.concatenate([reduction.apply(b["act"]) for b in source.activations(x, ["act"], 8)])
    fetched_before = source.bytes_fetched
    in_graph = np.concatenate([b["act"] for b in source.reduced_activations(x, {"act": reduction}, 8)])
    assert in_graph.dtype == np.float32 and in_graph.shape == (21, reduction.n_features_out)
    np.testing.assert_allclose(in_graph, host, rtol=1e-5, atol=1e-5)
    assert source.bytes_fetched - fetched_before == in_graph.nbytes  # only reduced features left the session


def test_float16_layers_are_reduced_in_float32(tmp_path, rng):
    source = OnnxSource(save_relu(tmp_path / "m.onnx", (6, 9, 7), TensorProto.FLOAT16))
    reduction = probecore.plan_reduction("act", (6, 9, 7), probecore.ReductionPolicy(max_features=60))
    x = rng.normal(size=(10, 6, 9, 7)).astype(np.float16)
    host = np.concatenate([reduction.apply(b["act"]) for b in source.activations(x, ["act"], 4)])
    in_graph = np.concatenate([b["act"] for b in source.reduced_activations(x, {"act": reduction}, 4)])
    np.testing.assert_allclose(in_graph, host, rtol=1e-3, atol=1e-3)


def test_pipeline_features_match_with_and_without_in_graph_reduction(tmp_path, rng):
    model = save_convnet(tmp_path / "c.onnx", rng, channels=6, size=10)
    x = rng.normal(size=(90, 3, 10, 10)).astype(np.float32)
    dataset = probecore.split_dataset(x, rng.integers(0, 3, 90), seed=1)
    policy = probecore.ReductionPolicy(max_features=100)
    results = {}
    for in_graph in (True, False):
        source = OnnxSource(model, reduce_in_graph=in_graph)
        chosen = probecore.select_layers(source.layers(), None)
        results[in_graph] = probecore.extract_features(source, dataset, chosen, probecore.RunSpec(policy=policy, batch_size=16))
    assert results[True].reduced_by_source and not results[False].reduced_by_source
    for layer, by_split in results[False].by_layer.items():
        for split, host in by_split.items():
            np.testing.assert_allclose(results[True].by_layer[layer][split], host, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[True].model_test_scores, results[False].model_test_scores, rtol=1e-5, atol=1e-5)


def test_in_graph_reduction_fetches_a_fraction_of_the_activations(rng):
    dataset = probecore.load_dataset(DEMO_DATA)
    small = probecore.split_dataset(dataset.test.x[:200], dataset.test.y[:200], seed=0)
    fetched = {}
    for in_graph in (True, False):
        source = OnnxSource(DEMO_MODEL, reduce_in_graph=in_graph)
        probecore.extract_features(source, small, probecore.select_layers(source.layers(), ["relu1", "relu2"]))
        fetched[in_graph] = source.bytes_fetched
    assert fetched[True] * 3 < fetched[False]


def _extracted(model, dataset, spec, **options):
    source = OnnxSource(model, device="cpu", **options)
    chosen = probecore.select_layers(source.layers(), None)
    return source, probecore.extract_features(source, dataset, chosen, spec)


@pytest.mark.parametrize("model_kind", ["branchy", "torch-exported"])
def test_one_concatenated_output_and_io_binding_give_the_same_features(tmp_path, rng, model_kind):
    # the default (every reduced layer in one output, split on the host) against one output per layer, with and
    # without I/O binding: the same bits, with layers reduced in the graph, whole layers and the model's scores
    if model_kind == "branchy":  # a residual add, a swish written as x * sigmoid(x), max pooling
        model, x = save_convnet(tmp_path / "c.onnx", rng, channels=6, size=10), rng.normal(size=(90, 3, 10, 10))
    else:  # weights in model.onnx.data and open sizes, as torch's exporter writes them
        model, x = save_open_convnet(tmp_path / "model.onnx", rng, external_data=True), rng.normal(size=(90, 3, 12, 12))
    dataset = probecore.split_dataset(x.astype(np.float32), np.arange(90) % 3, seed=1)
    spec = probecore.RunSpec(policy=probecore.ReductionPolicy(max_features=100), batch_size=16)
    _, separate = _extracted(model, dataset, spec, concat_reduced=False)
    source, joined = _extracted(model, dataset, spec)
    assert source.concat_reduced and joined.reduced_by_source is separate.reduced_by_source
    assert "model" in joined.reduced_in.values() and "host" not in joined.reduced_in.values()
    for options in ({"io_binding": True}, {"io_binding": True, "concat_reduced": False}):
        bound = _extracted(model, dataset, spec, **options)[1]
        for layer, by_split in separate.by_layer.items():
            for split, values in by_split.items():
                np.testing.assert_array_equal(joined.by_layer[layer][split], values)
                np.testing.assert_array_equal(bound.by_layer[layer][split], values)
        np.testing.assert_array_equal(bound.model_test_scores, separate.model_test_scores)
    np.testing.assert_array_equal(joined.model_test_scores, separate.model_test_scores)


def test_the_reduced_layers_leave_the_graph_as_one_output(tmp_path, rng):
    model = save_convnet(tmp_path / "c.onnx", rng, channels=6, size=10)
    source = OnnxSource(model, device="cpu")
    shapes = {layer.name: layer.shape for layer in source.layers()}
    policy = probecore.ReductionPolicy(max_features=60)
    reductions = {name: probecore.plan_reduction(name, shapes[name], policy) for name in ("relu", "swish", "pool")}
    batches = list(source.reduced_activations(rng.normal(size=(5, 3, 10, 10)).astype(np.float32), reductions, 8))
    outputs = [output.name for output in source._session.get_outputs()]
    assert outputs == ["::probe_features"]
    widths = [reduction.n_features_out for reduction in reductions.values()]
    assert source._session.get_outputs()[0].shape[1] == sum(widths)
    assert [batches[0][name].shape for name in reductions] == [(5, width) for width in widths]
