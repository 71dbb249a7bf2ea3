"""Token pooling (``ReductionPolicy(tokens=...)``) runs in the ONNX graph, reading the model's attention mask,
gives ``pool_tokens``' features, and ships only the pooled (N, D) features out of onnxruntime."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_model

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.reduction import TOKEN_POOLS, pool_tokens

N_TOKENS, WIDTH, VOCAB = 6, 8, 11
LAYERS = ["embedded", "projected", "hidden"]
OPSETS = [10, 13, 18]
PADDINGS = ["right", "left", "scattered"]


def save_encoder(path, rng, opset=18, n_tokens=N_TOKENS):
    """input_ids, attention_mask (N, T) int64 -> Gather "embedded" -> MatMul "projected" -> Relu "hidden"
    -> times the mask "out", every layer (N, T, D)."""
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], axis=0),
        helper.make_node("MatMul", ["embedded", "weight"], ["projected"]),
        helper.make_node("Relu", ["projected"], ["hidden"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["mask_float", "column"], ["mask_column"]),
        helper.make_node("Mul", ["hidden", "mask_column"], ["out"]),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", n_tokens]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", n_tokens]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", n_tokens, WIDTH])]
    initializers = [
        numpy_helper.from_array(rng.normal(size=(VOCAB, WIDTH)).astype(np.float32), "embedding"),
        numpy_helper.from_array(rng.normal(size=(WIDTH, WIDTH)).astype(np.float32), "weight"),
        numpy_helper.from_array(np.array([0, -1, 1], np.int64), "column"),
    ]
    return save_model(path, nodes, inputs, outputs, initializers, opset=opset)


def token_inputs(rng, padding, n_tokens=N_TOKENS, copies=1):
    """Sequences of every length 0..T (``copies`` times), padded on the right or left, or with real tokens
    scattered (mask values 0, 1, 3: nonzero is real); padding positions hold ordinary token ids."""
    lengths = np.tile(np.arange(n_tokens + 1), copies)
    positions = np.arange(n_tokens)[None, :]
    if padding == "right":
        mask = (positions < lengths[:, None]).astype(np.int64)
    elif padding == "left":
        mask = (positions >= n_tokens - lengths[:, None]).astype(np.int64)
    else:
        mask = rng.choice([0, 1, 3], size=(len(lengths), n_tokens)).astype(np.int64)
        mask[0] = 0
    ids = rng.integers(0, VOCAB, size=mask.shape)
    return probecore.pack_inputs(input_ids=ids, attention_mask=mask), mask


def raw_activations(source, x, names):
    """Every layer whole and the mask, as the host path sees them."""
    batches = list(source.activations(x, [*names, "attention_mask"], 5))
    return {name: np.concatenate([batch[name] for batch in batches]) for name in [*names, "attention_mask"]}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("tokens", TOKEN_POOLS)
def test_in_graph_token_pooling_equals_pool_tokens(tmp_path, rng, opset, padding, tokens):
    source = OnnxSource(save_encoder(tmp_path / "enc.onnx", rng, opset))
    x, mask = token_inputs(rng, padding, copies=2)
    source.check_inputs(x)
    assert source.mask_input == "attention_mask"
    policy = probecore.ReductionPolicy(tokens=tokens)
    plan = probecore.plan_reduction
    reductions = {name: plan(name, (N_TOKENS, WIDTH), policy, mask_input="attention_mask") for name in LAYERS}
    assert all(source.can_reduce(reduction) for reduction in reductions.values())
    raw = raw_activations(source, x, LAYERS)
    np.testing.assert_array_equal(raw["attention_mask"], mask)
    fetched_before = source.bytes_fetched
    batches = list(source.reduced_activations(x, reductions, 5))
    assert source.bytes_fetched - fetched_before == len(x) * WIDTH * 4 * len(LAYERS)  # pooled features only
    for name in LAYERS:
        in_graph = np.concatenate([batch[name] for batch in batches])
        assert in_graph.dtype == np.float32 and in_graph.shape == (len(x), WIDTH)
        np.testing.assert_allclose(in_graph, pool_tokens(raw[name], tokens, mask), rtol=1e-5, atol=1e-5)
    if tokens != "first":  # a sequence with no real token pools to zeros
        assert not in_graph[mask.any(axis=1) == 0].any()


@pytest.mark.parametrize("tokens", TOKEN_POOLS)
def test_extract_features_pools_tokens_in_the_graph(tmp_path, rng, tokens):
    path = save_encoder(tmp_path / "enc.onnx", rng)
    x, _ = token_inputs(rng, "right", copies=12)
    dataset = probecore.split_dataset(x, rng.integers(0, 3, len(x)), seed=1)
    policy = probecore.ReductionPolicy(tokens=tokens)
    results, fetched = {}, {}
    for in_graph in (True, False):
        source = OnnxSource(path, reduce_in_graph=in_graph)
        chosen = probecore.select_layers(source.layers(), LAYERS)
        results[in_graph] = probecore.extract_features(source, dataset, chosen, probecore.RunSpec(policy=policy, batch_size=16))
        fetched[in_graph] = source.bytes_fetched
    assert results[True].reduced_by_source and not results[False].reduced_by_source
    assert fetched[True] == len(x) * WIDTH * 4 * len(LAYERS)  # not N * T * D * 4
    assert fetched[False] == len(x) * N_TOKENS * WIDTH * 4 * len(LAYERS)
    for name, by_split in results[False].by_layer.items():
        assert results[True].reductions[name].tokens == tokens
        for split, host in by_split.items():
            np.testing.assert_allclose(results[True].by_layer[name][split], host, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [13, 18])
def test_a_subset_follows_the_token_pooling(tmp_path, rng, opset):
    source = OnnxSource(save_encoder(tmp_path / "enc.onnx", rng, opset))
    x, mask = token_inputs(rng, "left", copies=2)
    source.check_inputs(x)
    policy = probecore.ReductionPolicy(tokens="mean", max_features=5, seed=3)
    reduction = probecore.plan_reduction("hidden", (N_TOKENS, WIDTH), policy, mask_input="attention_mask")
    assert reduction.subset is not None and reduction.n_features_out == 5
    raw = raw_activations(source, x, ["hidden"])
    in_graph = np.concatenate([batch["hidden"] for batch in source.reduced_activations(x, {"hidden": reduction}, 4)])
    np.testing.assert_allclose(in_graph, reduction.apply(raw["hidden"], mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
def test_without_a_mask_input_every_token_is_real(tmp_path, rng, opset):
    nodes = [helper.make_node("Relu", ["x"], ["act"]), helper.make_node("Identity", ["act"], ["out"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", N_TOKENS, WIDTH])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", N_TOKENS, WIDTH])]
    source = OnnxSource(save_model(tmp_path / "m.onnx", nodes, inputs, outputs, [], opset=opset))
    assert source.mask_input is None
    x = rng.normal(size=(9, N_TOKENS, WIDTH)).astype(np.float32)
    raw = np.concatenate([batch["act"] for batch in source.activations(x, ["act"], 4)])
    for tokens in TOKEN_POOLS:
        reduction = probecore.plan_reduction("act", (N_TOKENS, WIDTH), probecore.ReductionPolicy(tokens=tokens))
        assert source.can_reduce(reduction)
        in_graph = np.concatenate([batch["act"] for batch in source.reduced_activations(x, {"act": reduction}, 4)])
        np.testing.assert_allclose(in_graph, pool_tokens(raw, tokens), rtol=1e-5, atol=1e-5)


def test_a_layer_with_another_token_count_than_the_mask_is_pooled_on_the_host(tmp_path, rng):
    source = OnnxSource(save_encoder(tmp_path / "enc.onnx", rng))
    source.check_inputs(token_inputs(rng, "right")[0])
    policy = probecore.ReductionPolicy(tokens="mean")
    fits = probecore.plan_reduction("hidden", (N_TOKENS, WIDTH), policy, mask_input="attention_mask")
    longer = probecore.plan_reduction("hidden", (N_TOKENS + 1, WIDTH), policy, mask_input="attention_mask")
    assert source.can_reduce(fits) and not source.can_reduce(longer)
    assert not OnnxSource(source.path, reduce_in_graph=False).can_reduce(fits)


def test_an_exported_torch_transformer_pools_tokens_in_the_graph(tmp_path, rng):
    torch = pytest.importorskip("torch")
    from probecore.backends import torch as probe_torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 16)
            layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

        def forward(self, input_ids, attention_mask):
            return self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)

    torch.manual_seed(0)
    x, mask = token_inputs(rng, "right", copies=6)
    x, mask = x[mask.any(axis=1)], mask[mask.any(axis=1)]  # torch's attention gives NaN with no real token
    example = {"input_ids": x["input_ids"][:2], "attention_mask": x["attention_mask"][:2]}
    path = probe_torch.export(Encoder().eval(), example, tmp_path / "enc.onnx")
    dataset = probecore.split_dataset(x, rng.integers(0, 3, len(x)), seed=1)
    names = ["encoder.layers.0.norm1", "encoder.layers.0.linear1", "output"]  # (T, 16), (T, 32), (T, 16)
    for tokens in TOKEN_POOLS:
        results, fetched = {}, {}
        for in_graph in (True, False):
            source = OnnxSource(path, reduce_in_graph=in_graph)
            chosen = probecore.select_layers(source.layers(), names)
            policy = probecore.ReductionPolicy(tokens=tokens)
            results[in_graph] = probecore.extract_features(source, dataset, chosen, probecore.RunSpec(policy=policy))
            fetched[in_graph] = source.bytes_fetched
        assert results[True].reduced_by_source and not results[False].reduced_by_source
        assert fetched[True] * N_TOKENS == fetched[False] == len(x) * N_TOKENS * (16 + 32 + 16) * 4
        for name, by_split in results[False].by_layer.items():
            for split, host in by_split.items():
                np.testing.assert_allclose(results[True].by_layer[name][split], host, rtol=1e-5, atol=1e-5)
