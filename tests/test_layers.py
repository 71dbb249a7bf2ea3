"""Choosing layers by name, glob and op type."""

import pytest

from probecore.errors import LayerSelectionError
from probecore.layers import parse_layer_spec, select_layers
from probecore.source import LayerInfo

LAYERS = [
    LayerInfo("x", "Input", (3, 8, 8)),
    LayerInfo("stem.conv", "Conv", (8, 8, 8), default=False),
    LayerInfo("stem.relu", "Relu", (8, 8, 8)),
    LayerInfo("block1.add", "Add", (8, 8, 8)),
    LayerInfo("block1.relu", "Relu", (8, 8, 8)),
    LayerInfo("logits", "Gemm", (10,), is_output=True),
]


def names(layers):
    return [layer.name for layer in layers]


def test_op_prefix_carries_over_to_following_entries():
    assert parse_layer_spec("op:Relu,Add") == ["op:Relu", "op:Add"]
    assert parse_layer_spec("op:Relu, name:logits,x") == ["op:Relu", "name:logits", "name:x"]
    assert parse_layer_spec("a,,b ") == ["name:a", "name:b"]


def test_selection_keeps_model_order_whatever_the_entry_order():
    assert names(select_layers(LAYERS, ["logits", "op:relu", "block1.*"])) == [
        "stem.relu", "block1.add", "block1.relu", "logits",
    ]  # fmt: skip


def test_no_entries_picks_the_default_layers():
    assert names(select_layers(LAYERS, None)) == ["x", "stem.relu", "block1.add", "block1.relu", "logits"]


def test_unknown_name_suggests_close_matches():
    with pytest.raises(LayerSelectionError, match="unknown layer 'stem.rel'; did you mean stem.relu"):
        select_layers(LAYERS, ["stem.rel"])


@pytest.mark.parametrize(
    "entry, message",
    [("block9.*", "pattern 'block9.*' matches no layer"), ("op:Softmax", "op types here: Add, Conv, Gemm")],
)
def test_entries_that_match_nothing_are_errors(entry, message):
    with pytest.raises(LayerSelectionError, match=message.replace(".", r"\.").replace("*", r"\*")):
        select_layers(LAYERS, parse_layer_spec(entry))
