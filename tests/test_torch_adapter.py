"""The PyTorch adapter: exported activations equal torch's own, readable layer names, transformers with padding,
and a one-line error when torch is missing."""

import sys

import numpy as np
import pytest
import torch

import probecore
from probecore.backends import torch as probe_torch
from probecore.backends.onnx_source import OnnxSource

TOL = dict(rtol=1e-4, atol=1e-4)


class Block(torch.nn.Module):
    """A residual block calling one ReLU module twice, as torchvision's blocks do."""

    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(self.relu(x)) + x)


class BranchedNet(torch.nn.Module):
    """A stem, two residual blocks, and two heads: the main one and an auxiliary one (as in Inception v3)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.layer1 = torch.nn.Sequential(Block(8), Block(8))
        self.aux = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4))
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))

    def forward(self, x):
        features = self.layer1(self.stem(x))
        return self.head(features), self.aux(features)


def torch_outputs(module, x, names):
    """Each named module's output as torch computes it (the last call for a module called more than once)."""
    captured = {}
    modules = dict(module.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out))
               for name in names]  # fmt: skip
    with torch.no_grad():
        outputs = module(torch.from_numpy(x))
    for handle in handles:
        handle.remove()
    return {name: value.numpy() for name, value in captured.items()}, [out.numpy() for out in outputs]


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    torch.manual_seed(0)
    model = BranchedNet().eval()
    path = probe_torch.export(model, torch.randn(2, 3, 16, 16), tmp_path_factory.mktemp("torch") / "net.onnx")
    return model, OnnxSource(path)


def test_modules_name_the_tensors_they_return(branched):
    _, source = branched
    layers = {layer.name: layer for layer in source.layers()}
    named = ["stem.0", "stem.1", "stem.2", "layer1.0.relu", "layer1.0.conv", "layer1.0", "layer1.1", "head.0"]
    assert set(named) <= set(layers)
    assert layers["layer1.0"].op_type == "Block" and layers["stem.1"].op_type == "ReLU"
    assert layers["output_0"].is_output and layers["output_1"].is_output
    defaults = [layer.name for layer in source.layers() if layer.default]
    # a block's output is named after the block, not its last ReLU; a Sequential names nothing its members do
    assert {"x", "stem.1", "stem.2", "layer1.0", "layer1.1", "output_0", "output_1"} <= set(defaults)
    assert "layer1" not in layers and "stem" not in layers and "stem.0" not in defaults


def test_activations_through_the_adapter_equal_torch_on_both_branches(branched, rng):
    model, source = branched
    x = rng.normal(size=(7, 3, 16, 16)).astype(np.float32)
    names = ["stem.1", "stem.2", "layer1.0", "layer1.1", "head.0", "output_0", "output_1"]
    expected, (main, aux) = torch_outputs(model, x, ["stem.1", "stem.2", "layer1.0", "layer1.1", "head.0"])
    batches = list(source.activations(x, names, batch_size=3))  # uneven batches: the batch axis is dynamic
    got = {name: np.concatenate([batch[name] for batch in batches]) for name in names}
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, **TOL, err_msg=name)
    np.testing.assert_allclose(got["output_0"], main, **TOL)
    np.testing.assert_allclose(got["output_1"], aux, **TOL)


def test_probe_module_reports_readable_layers_from_torch_tensors(rng):
    torch.manual_seed(1)
    model = BranchedNet()
    labels = rng.integers(0, 3, size=300)
    images = rng.normal(size=(300, 3, 16, 16)).astype(np.float32)
    images[:, 0] += labels[:, None, None]  # the class shifts the first channel
    report = probe_torch.probe_module(model, torch.from_numpy(images), torch.from_numpy(labels))
    by_name = {layer.name: layer for layer in report.layers}
    assert {"x", "stem.1", "layer1.0", "layer1.1"} <= set(by_name)
    assert by_name["x"].metrics["test"].error < 0.1  # the input carries the labels linearly
    assert model.training  # the adapter exported in eval mode and gave the module back as it was


class TinyEncoder(torch.nn.Module):
    """Token ids and an attention mask (1: real token, 0: padding) in, class scores out."""

    def __init__(self, vocab=20, width=16, classes=3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        layer = torch.nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(hidden[:, 0])


@pytest.mark.parametrize("tokens", ["mean", "max", "first", "last"])
def test_transformer_layers_are_pooled_over_real_tokens_only(tokens, tmp_path, rng):
    torch.manual_seed(2)
    model = TinyEncoder().eval()
    n, width = 9, 10
    lengths = rng.integers(1, width + 1, size=n)
    lengths[0] = width
    ids = rng.integers(1, 20, size=(n, width))
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask  # padding id 0
    path = probe_torch.export(model, {"input_ids": ids[:2], "attention_mask": mask[:2]}, tmp_path / "enc.onnx")
    source = OnnxSource(path)
    assert source.mask_input == "attention_mask"
    block = "encoder.layers.1"
    layer = next(layer for layer in source.layers() if layer.name == block)
    assert layer.default and layer.op_type == "TransformerEncoderLayer"
    x = probecore.pack_inputs(input_ids=ids, attention_mask=mask)
    dataset = probecore.split_dataset(np.concatenate([x] * 4), np.arange(4 * n) % 3)
    extracted = probecore.extract_features(source, dataset, [layer], probecore.RunSpec(policy=probecore.ReductionPolicy(tokens=tokens)))
    assert extracted.reductions[block].tokens == tokens  # pooled in the graph or on the host: the same features
    # reference: each sequence alone, unpadded, through torch; padding must change nothing
    hooks = {}
    module = dict(model.named_modules())[block]
    handle = module.register_forward_hook(lambda m, a, out: hooks.__setitem__("out", out))
    expected = []
    with torch.no_grad():
        for row in range(n):
            length = lengths[row]
            model(torch.from_numpy(ids[row : row + 1, :length]), torch.ones(1, length, dtype=torch.int64))
            hidden = hooks["out"][0].numpy().astype(np.float64)
            expected.append({"mean": hidden.mean(0), "max": hidden.max(0), "first": hidden[0], "last": hidden[-1]}[tokens])
    handle.remove()
    features = np.concatenate([extracted.by_layer[block][split] for split in ("train", "valid", "test")])
    rows = np.concatenate([dataset.train.x, dataset.valid.x, dataset.test.x])
    order = [int(np.flatnonzero((ids == r["input_ids"]).all(1) & (mask == r["attention_mask"]).all(1))[0]) for r in rows]
    np.testing.assert_allclose(features, np.array(expected)[order], rtol=1e-3, atol=1e-4)


def test_a_missing_torch_gives_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(probecore.ExtraNotInstalledError, match=r"^PyTorch is not installed; install it with: pip install 'probecore\[torch\]'$"):
        probe_torch.export(object(), np.zeros((2, 3)), "never.onnx")


def test_record_probes_the_current_weights_into_a_tracker(rng):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    labels = rng.integers(0, 3, size=300)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    x[:, 0] += 3 * labels
    tracker = probecore.ProbeTracker(probecore.split_dataset(x, labels, seed=0), probecore.RunSpec(layers=["1", "output"]))
    first = probe_torch.record(tracker, "init", model, x[:2])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
        optimizer.step()
    probe_torch.record(tracker, "trained", model, x[:2])
    assert tracker.sweep.checkpoints == ["init", "trained"] and tracker.sweep.layers == ["1", "output"]
    assert first.settings["source"]["model"] == "torch module Sequential" and model.training
    own = [report.model_test.error for report in tracker.sweep.reports]
    assert own[1] < own[0] and own[1] < 0.15  # the second checkpoint saw the trained weights
