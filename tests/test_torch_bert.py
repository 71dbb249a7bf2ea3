"""The PyTorch adapter on a BERT-style encoder: dict inputs bound to ``forward`` by name (any order, keyword-only
and defaulted parameters), layers named after the encoder layer they end, outputs after what ``forward``
returns. The exported file is checked against torch's own outputs with onnxruntime."""

import re
from collections import OrderedDict, namedtuple

import numpy as np
import onnxruntime
import pytest
import torch

import probecore
from probecore.backends import torch as probe_torch
from probecore.backends.onnx_source import OnnxSource

TOL = dict(rtol=1e-4, atol=1e-4)
VOCAB, WIDTH, HEADS, LAYERS, TOKENS = 30, 16, 2, 4, 7


class ModelOutput(OrderedDict):
    """What HuggingFace's models return: an OrderedDict subclass."""


class Embeddings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(VOCAB, WIDTH)
        self.position_embeddings = torch.nn.Embedding(TOKENS, WIDTH)
        self.token_type_embeddings = torch.nn.Embedding(2, WIDTH)
        self.LayerNorm = torch.nn.LayerNorm(WIDTH)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        embedded = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(embedded + self.token_type_embeddings(token_type_ids))


class SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, hidden, mask_bias):
        n, t, _ = hidden.shape

        def heads(x):
            return x.view(n, t, HEADS, WIDTH // HEADS).transpose(1, 2)

        scores = heads(self.query(hidden)) @ heads(self.key(hidden)).transpose(-1, -2) / (WIDTH // HEADS) ** 0.5
        context = (scores + mask_bias).softmax(-1) @ heads(self.value(hidden))
        return (context.transpose(1, 2).reshape(n, t, WIDTH),)


class ResidualOutput(torch.nn.Module):
    """BertSelfOutput and BertOutput: a projection added to the sublayer's input, then LayerNorm."""

    def __init__(self, width_in):
        super().__init__()
        self.dense = torch.nn.Linear(width_in, WIDTH)
        self.LayerNorm = torch.nn.LayerNorm(WIDTH)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dense(hidden) + residual)


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self = SelfAttention()
        self.output = ResidualOutput(WIDTH)

    def forward(self, hidden, mask_bias):
        return (self.output(self.self(hidden, mask_bias)[0], hidden),)


class Intermediate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.intermediate_act_fn = torch.nn.GELU()

    def forward(self, hidden):
        return self.intermediate_act_fn(self.dense(hidden))


class Layer(torch.nn.Module):
    """HuggingFace's BertLayer: its output is its last submodule's (``output``), returned in a tuple."""

    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.intermediate = Intermediate()
        self.output = ResidualOutput(2 * WIDTH)

    def forward(self, hidden, mask_bias):
        attended = self.attention(hidden, mask_bias)[0]
        return (self.output(self.intermediate(attended), attended),)


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, hidden, mask_bias):
        for layer in self.layer:
            hidden = layer(hidden, mask_bias)[0]
        return hidden


class Pooler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(WIDTH, WIDTH)
        self.activation = torch.nn.Tanh()

    def forward(self, hidden):
        return self.activation(self.dense(hidden[:, 0]))


class TinyBert(torch.nn.Module):
    """A BERT-style encoder whose ``forward`` takes its inputs in HuggingFace's order, two of them optional."""

    def __init__(self):
        super().__init__()
        self.embeddings = Embeddings()
        self.encoder = Encoder()
        self.pooler = Pooler()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        mask_bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), mask_bias)
        return ModelOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))


def bert_inputs(rng, n):
    """Padded token ids, a mask and token types, in another order than ``forward``'s parameters."""
    lengths = rng.integers(2, TOKENS + 1, size=n)
    mask = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, size=(n, TOKENS)) * mask
    types = (np.arange(TOKENS)[None, :] >= lengths[:, None] // 2).astype(np.int64) * mask  # two segments
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def torch_run(model, inputs, names=()):
    """``model(**inputs)`` as torch computes it, and the named modules' outputs (their first tensor)."""
    captured, modules = {}, dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out))
               for name in names]  # fmt: skip
    with torch.no_grad():
        outputs = model(**{name: torch.from_numpy(value) for name, value in inputs.items()})
    for handle in handles:
        handle.remove()
    layers = {name: (out[0] if isinstance(out, tuple) else out).numpy() for name, out in captured.items()}
    return {name: value.numpy() for name, value in outputs.items()}, layers


def onnx_run(path, inputs):
    """The exported file run by onnxruntime alone: its inputs by name, and its outputs by name."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return [value.name for value in session.get_inputs()], dict(zip(names, session.run(names, inputs)))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """TinyBert exported from a dict in the order input_ids, token_type_ids, attention_mask."""
    torch.manual_seed(0)
    model = TinyBert().eval()
    example = bert_inputs(np.random.default_rng(0), 2)
    path = probe_torch.export(model, example, tmp_path_factory.mktemp("bert") / "bert.onnx")
    return model, path


def test_dict_inputs_in_another_order_than_forward_are_passed_by_name(bert, rng):
    model, path = bert
    inputs = bert_inputs(rng, 5)
    expected, layers = torch_run(model, inputs, ["encoder.layer.1"])
    with torch.no_grad():  # the old wiring, by position in the dict's order, gives other outputs
        miswired = model(*(torch.from_numpy(value) for value in inputs.values()))["last_hidden_state"].numpy()
    assert not np.allclose(miswired, expected["last_hidden_state"], **TOL)
    input_names, got = onnx_run(path, inputs)
    assert input_names == ["input_ids", "token_type_ids", "attention_mask"]  # the dict's names, in its order
    assert set(got) == {"last_hidden_state", "pooler_output"}
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, **TOL, err_msg=name)
    x = probecore.pack_inputs(**inputs)
    (batch,) = OnnxSource(path).activations(x, ["encoder.layer.1"], batch_size=5)
    np.testing.assert_allclose(batch["encoder.layer.1"], layers["encoder.layer.1"], **TOL)


def test_an_encoder_layer_is_named_after_the_layer_not_its_last_submodule(bert):
    _, path = bert
    layers = {layer.name: layer for layer in OnnxSource(path).layers()}
    blocks = [f"encoder.layer.{i}" for i in range(LAYERS - 1)]  # the last one is the model's output
    assert all(layers[name].op_type == "Layer" and layers[name].default for name in blocks)
    assert not {f"encoder.layer.{i}.output" for i in range(LAYERS)} & set(layers)  # the layer's last sub-block
    assert layers["encoder.layer.0.attention.output"].op_type == "ResidualOutput"  # a sub-block is still one
    assert probecore.select_layers(list(layers.values()), ["encoder.layer.?"]) == [layers[name] for name in blocks]
    outputs = [name for name, layer in layers.items() if layer.is_output]
    assert outputs == ["last_hidden_state", "pooler_output"]  # the keys of what forward returns


def test_a_defaulted_parameter_left_out_keeps_its_default_and_is_no_input(bert, tmp_path, rng):
    model, _ = bert
    inputs = bert_inputs(rng, 4)
    del inputs["token_type_ids"]  # forward's default: all zeros
    example = {"attention_mask": inputs["attention_mask"][:2], "input_ids": inputs["input_ids"][:2]}
    path = probe_torch.export(model, example, tmp_path / "bert.onnx")
    expected, _ = torch_run(model, inputs)
    input_names, got = onnx_run(path, inputs)
    assert input_names == ["attention_mask", "input_ids"]
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, **TOL, err_msg=name)


class KeywordOnly(torch.nn.Module):
    """Images scaled by a per-sample weight given by keyword only, then a convolution; a namedtuple out."""

    Result = namedtuple("Result", ["logits", "features"])

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, images, *, weight, bias=0.5):
        features = torch.relu(self.conv(images * weight[:, :, None, None])) + bias
        return self.Result(self.head(features.mean((2, 3))), features)


def test_a_keyword_only_parameter_takes_its_input_and_a_namedtuple_names_the_outputs(tmp_path, rng):
    torch.manual_seed(1)
    model = KeywordOnly().eval()
    inputs = {"weight": rng.uniform(0.5, 2, size=(3, 1)).astype(np.float32),
              "images": rng.normal(size=(3, 3, 6, 6)).astype(np.float32)}  # fmt: skip
    path = probe_torch.export(model, {name: value[:2] for name, value in inputs.items()}, tmp_path / "kw.onnx")
    with torch.no_grad():
        expected = model(**{name: torch.from_numpy(value) for name, value in inputs.items()})
    input_names, got = onnx_run(path, inputs)
    assert input_names == ["weight", "images"] and list(got) == ["logits", "features"]
    np.testing.assert_allclose(got["logits"], expected.logits.numpy(), **TOL)
    np.testing.assert_allclose(got["features"], expected.features.numpy(), **TOL)


def test_an_input_forward_does_not_take_is_one_line_naming_its_parameters(bert, tmp_path, rng):
    model, _ = bert
    inputs = bert_inputs(rng, 2)
    inputs["mask"] = inputs.pop("attention_mask")
    message = ("input 'mask' is not a parameter of TinyBert.forward(input_ids, attention_mask, token_type_ids); "
               "name each input after one of its parameters")  # fmt: skip
    with pytest.raises(probecore.errors.DataError, match=f"^{re.escape(message)}$"):
        probe_torch.export(model, inputs, tmp_path / "never.onnx")
    with pytest.raises(probecore.errors.DataError, match=f"^{re.escape(message)}$"):  # probe_module: the same
        probe_torch.probe_module(model, inputs, np.zeros(2, dtype=np.int64))
    missing = ("the inputs do not fit TinyBert.forward(input_ids, attention_mask, token_type_ids): missing a required "
               "argument: 'input_ids'; give every parameter it needs by name, or a tuple in its order")  # fmt: skip
    with pytest.raises(probecore.errors.DataError, match=f"^{re.escape(missing)}$"):
        probe_torch.export(model, {"attention_mask": inputs["mask"]}, tmp_path / "never.onnx")
    assert not list(tmp_path.iterdir())


def test_attention_scores_are_a_side_branch_and_the_layers_the_main_path(bert, rng):
    # the scores plus the mask's bias, (heads, T, T), were default layers, and read worse than the encoder layers
    # around them: "non-monotonic" notes that said nothing about the encoder
    _, path = bert
    layers = OnnxSource(path).layers()
    scores = [layer for layer in layers if layer.shape == (HEADS, TOKENS, TOKENS) and layer.op_type == "Add"]
    assert len(scores) == LAYERS and {layer.role for layer in scores} == {"side"}
    assert not any(layer.default for layer in layers if layer.role == "side")
    roles = {layer.name: layer.role for layer in layers}
    assert {roles[f"encoder.layer.{i}"] for i in range(LAYERS - 1)} == {"main"}
    inputs = bert_inputs(rng, 400)
    labels = (inputs["input_ids"][:, 0] > VOCAB // 2).astype(np.int64)  # the first token's id: readable all along
    report = probe_torch.probe_module(bert[0], inputs, labels, probecore.RunSpec(fit=probecore.FitOptions(l2=1e-3)))
    assert not any(layer.role == "side" for layer in report.layers)
    probed = {layer.name: layer for layer in report.layers}
    upstream, pending = set(), list(probed["encoder.layer.1"].parents)
    while pending:  # the probed layers encoder.layer.1 is computed from, back to layer 0
        name = pending.pop()
        upstream.add(name)
        pending += probed[name].parents
    assert "encoder.layer.0" in upstream
    assert probed["encoder.layer.1.intermediate"].role == "branch"  # the feed-forward, added back by its residual
