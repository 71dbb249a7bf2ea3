"""The Keras adapter: converted activations equal Keras's own on a branched model, layer names and
channels-last pooling, and a one-line error when TensorFlow is missing."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter

import numpy as np
import pytest
import tensorflow as tf

import probecore
from probecore.backends import tensorflow as probe_tf
from probecore.backends.onnx_source import OnnxSource
from reference import pool2d

keras = tf.keras
TOL = dict(rtol=1e-4, atol=1e-4)
LAYERS = ["conv1", "pool1", "conv2", "relu2", "add", "gap", "aux_flat"]


def branched_model():
    """A small channels-last convnet with a residual Add and an auxiliary head beside the main one."""
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(image)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    aux = keras.layers.Dense(4, name="aux_head")(keras.layers.Flatten(name="aux_flat")(x))
    branch = keras.layers.ReLU(name="relu2")(keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x))
    x = keras.layers.Add(name="add")([x, branch])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(image, [keras.layers.Dense(5, name="logits")(x), aux])


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    model = branched_model()
    return model, OnnxSource(probe_tf.export(model, tmp_path_factory.mktemp("keras") / "net.onnx"))


def test_layers_keep_their_keras_names_kinds_and_axes(branched):
    _, source = branched
    layers = {layer.name: layer for layer in source.layers()}
    assert set(LAYERS) <= set(layers)
    assert layers["conv1"].op_type == "Conv2D" and layers["conv1"].shape == (14, 14, 8)
    assert layers["conv1"].layout == "channels_last" and layers["gap"].layout is None
    assert layers["logits"].is_output and layers["aux_head"].is_output
    defaults = [layer.name for layer in source.layers() if layer.default]
    # tf2onnx's own channels-first copies are listed but never default picks
    assert defaults == ["image", "conv1", "pool1", "relu2", "add", "aux_head", "gap", "logits"]


def test_activations_through_the_adapter_equal_keras_on_both_branches(branched, rng):
    model, source = branched
    x = rng.normal(size=(7, 16, 16, 3)).astype(np.float32)
    names = [*LAYERS, "logits", "aux_head"]
    expected = keras.Model(model.inputs, [model.get_layer(name).output for name in names])([x])
    batches = list(source.activations(x, names, batch_size=3))
    for name, value in zip(names, expected):
        got = np.concatenate([batch[name] for batch in batches])
        np.testing.assert_allclose(got, np.asarray(value), **TOL, err_msg=name)


def test_channels_last_feature_maps_are_pooled_over_height_and_width(branched, rng):
    model, source = branched
    x = rng.normal(size=(40, 16, 16, 3)).astype(np.float32)
    dataset = probecore.split_dataset(x, np.arange(40) % 2)
    conv1 = next(layer for layer in source.layers() if layer.name == "conv1")
    policy = probecore.ReductionPolicy(max_features=8 * 5 * 5)  # 14x14x8 -> 3x3 windows: 8 x 5 x 5
    extracted = probecore.extract_features(source, dataset, [conv1], probecore.RunSpec(policy=policy))
    reduction = extracted.reductions["conv1"]
    assert reduction.layout == "channels_last" and reduction.window == 3
    maps = np.asarray(keras.Model(model.inputs, model.get_layer("conv1").output)([dataset.train.x]))
    expected = pool2d(maps.transpose(0, 3, 1, 2), 3, "avg")  # pool each channel's 14x14 map
    features = extracted.by_layer["conv1"]["train"]  # channel-major, as for channels-first maps
    np.testing.assert_allclose(features, expected.reshape(len(features), -1), **TOL)


def test_probe_model_finds_the_labels_in_the_input(rng):
    labels = rng.integers(0, 3, size=300)
    images = rng.normal(size=(300, 16, 16, 3)).astype(np.float32)
    images[..., 0] += labels[:, None, None]
    report = probe_tf.probe_model(branched_model(), images, labels, probecore.RunSpec(layers="image,conv1,add"))
    assert [layer.name for layer in report.layers] == ["image", "conv1", "add"]
    assert report.layers[0].metrics["test"].error < 0.1


def test_a_missing_tensorflow_gives_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(probecore.ExtraNotInstalledError, match=r"^TensorFlow is not installed; install it with: pip install 'probecore\[tf\]'$"):
        probe_tf.export(object(), "never.onnx")


def test_a_keras_models_input_is_pooled_channels_last_on_a_task_defined_by_the_colours(tmp_path, rng):
    # 96 x 96 x 3 images whose class is their brightest colour: pooled as channels-first (C = 96, H = 96, W = 3)
    # the colours are averaged together and the input reads nothing; pooled over H and W it reads them all
    keras.utils.set_random_seed(0)
    image = keras.Input((96, 96, 3), name="image")
    x = keras.layers.Rescaling(1 / 255, name="scale")(image)
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu", name="conv")(x)
    model = keras.Model(image, keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D(name="gap")(x)))
    labels = rng.integers(0, 3, 300)
    images = rng.uniform(0, 150, (300, 96, 96, 3)).astype(np.float32)
    images[np.arange(300), :, :, labels] += 60
    source = OnnxSource(probe_tf.export(model, tmp_path / "colours.onnx"))
    assert {layer.name: layer.layout for layer in source.layers()}["image"] == "channels_last"
    policy = probecore.ReductionPolicy(max_features=1024)
    spec = probecore.RunSpec(layers=["image"], policy=policy, fit=probecore.FitOptions(l2=1e-3))
    report = probecore.run_probes(source, probecore.split_dataset(images, labels), spec)
    (layer,) = report.layers
    assert layer.reduction["layout"] == "channels_last" and layer.reduction["description"] == "avgpool 6x6"
    assert layer.metrics["test"].error < 0.05


def test_a_plain_tf2onnx_export_gets_its_composite_activations_and_layout_from_the_graph(tmp_path):
    # a file converted by someone else with tf2onnx, not through the adapter: no layer metadata, so the
    # activations Keras wrote out of elementary ops and the NHWC input are read from the graph itself
    import onnx
    import tf2onnx

    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="hard_swish", name="conv")(image)
    x = keras.layers.Conv2D(8, 3, activation="swish", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Identity()(x))
    model = keras.Model(image, keras.layers.Dense(3, activation="hard_sigmoid", name="dense")(x))
    spec = (tf.TensorSpec((None, 16, 16, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    layers = OnnxSource(tmp_path / "plain.onnx").layers()
    defaults = [(layer.op_type, layer.role) for layer in layers if layer.default]
    assert defaults == [("Input", "main"), ("HardSwish", "main"), ("Swish", "main"), ("GlobalAveragePool", "main"),
                        ("HardSigmoid", "main")]  # fmt: skip
    assert layers[0].layout == "channels_last"
    assert not any(layer.default for layer in layers if layer.op_type in ("Clip", "Sigmoid"))  # inside them
