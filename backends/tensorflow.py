"""TensorFlow/Keras adapter: convert a Keras model to ONNX with tf2onnx, each layer's output named after the
layer, then probe it through the ONNX path. Conversion and delegation only; needs ``probecore[tf]``.

    from probecore.backends import tensorflow as probe_tf

    report = probe_tf.probe_model(model, images, labels)   # (N, H, W, C) numpy inputs
    probe_tf.export(model, "model.onnx")                    # then: probe run model.onnx --data ...

Keras feature maps are channels-last, (N, H, W, C); the adapter records that for each named layer, so they
are pooled over H and W without ``--channels-last``. Defaults: the input, activation layers and layers with
a non-linear ``activation``, pooling, ``Add`` and ``Concatenate``, nested models (blocks) and the model's
outputs. Tensors that tf2onnx adds itself (its channels-first copies) are listed by ``--all`` but never
picked by default.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np

import probecore
from probecore.errors import DataError, ModelError

from . import adapter
from .adapter import NamedLayer
from .onnx_graph import first_line

OPSET = 17
MERGE_KINDS = {"Add", "Concatenate"}


def _frameworks():
    tf = adapter.require("tensorflow", "tf", "TensorFlow")
    tf2onnx = adapter.require("tf2onnx", "tf", "tf2onnx")
    return tf, tf2onnx


def export(model, path: str | Path) -> Path:
    """Convert the Keras ``model`` to ONNX at ``path`` (dynamic batch axis, layer names on tensors)."""
    tf, tf2onnx = _frameworks()
    keras = tf.keras
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise DataError("the Keras model has no defined inputs; build it with keras.Input(...) or call it once on a batch")
    outputs = list(model.outputs)
    by_tensor = {}
    for layer in model.layers:
        try:
            tensor = layer.output
        except (AttributeError, ValueError, RuntimeError):  # shared layers have several outputs
            continue
        if isinstance(tensor, (list, tuple)) or type(layer).__name__ == "InputLayer":
            continue
        by_tensor[id(tensor)] = (layer, tensor)
    output_names = [by_tensor[id(t)][0].name if id(t) in by_tensor else f"output_{i}" for i, t in enumerate(outputs)]
    taken = {id(t) for t in [*inputs, *outputs]}
    named = [(layer, tensor) for key, (layer, tensor) in by_tensor.items() if key not in taken]
    exposing = keras.Model(inputs, [*outputs, *(tensor for _, tensor in named)])
    signature = tuple(
        tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype, name=_input_name(tensor, i)) for i, tensor in enumerate(inputs)
    )  # fmt: skip
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            proto, _ = tf2onnx.convert.from_keras(exposing, input_signature=signature, opset=OPSET)
    except Exception as exc:
        raise ModelError(f"tf2onnx could not convert the model: {type(exc).__name__}: {first_line(exc)}") from None
    wanted = [*output_names, *(layer.name for layer, _ in named)]
    adapter.rename_values(proto, {value.name: name for value, name in zip(proto.graph.output, wanted)})
    adapter.sort_by_depth(proto)
    layers = [NamedLayer(layer.name, type(layer).__name__, _layout(tensor, keras), _is_default(layer, keras))
              for layer, tensor in named]  # fmt: skip
    return adapter.finish_export(proto, path, output_names, layers, "keras", others_default=False)


def probe_model(model, x, y, spec: probecore.RunSpec = probecore.RunSpec()) -> probecore.ProbeReport:
    """Probe the layers ``spec`` names (default: every default layer) of the Keras ``model`` on inputs ``x``
    and labels ``y``, split as ``spec`` says."""
    with adapter.temporary_export(lambda path: export(model, path)) as path:
        return adapter.probe_exported(path, np.asarray(x), np.asarray(y), spec, f"keras model {model.name}")


def _input_name(tensor, index: int) -> str:
    name = getattr(tensor, "name", "") or ""
    return name.split(":")[0] or f"input_{index}"


def _layout(tensor, keras) -> str | None:
    if len(tensor.shape) == 4:
        return "channels_last" if keras.config.image_data_format() == "channels_last" else "channels_first"
    return None


def _is_default(layer, keras) -> bool:
    kind = type(layer).__name__
    if kind in MERGE_KINDS or "Pooling" in kind or isinstance(layer, keras.Model):
        return True
    if kind in ("Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax"):
        return True
    activation = getattr(layer, "activation", None)
    return activation is not None and getattr(activation, "__name__", "linear") != "linear"

