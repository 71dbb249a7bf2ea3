"""Control tasks: control labels depend on the input alone, and selectivity tells encoding from memorizing."""

import numpy as np
import pytest

import probecore
from probecore.control import control_labels


def _repeated_inputs(rng, n_distinct=240, repeats=4, n_classes=3):
    """``n_distinct`` inputs (ids), each seen ``repeats`` times, spread over all three splits."""
    ids = np.repeat(np.arange(n_distinct), repeats)
    labels = rng.integers(0, n_classes, n_distinct)[ids]
    return probecore.split_dataset(ids, labels, seed=1), labels


def test_identical_inputs_get_identical_control_labels_in_every_split(rng):
    dataset, _ = _repeated_inputs(rng)
    labels = control_labels(dataset)
    seen = {}
    for name, split in dataset.splits().items():
        assert labels[name].shape == (len(split),) and labels[name].dtype == np.int64
        for sample, label in zip(split.x, labels[name]):
            assert seen.setdefault(int(sample), label) == label
    assert len(set(seen.values())) == 3  # not all one class
    again = control_labels(dataset)
    assert all(np.array_equal(labels[name], again[name]) for name in labels)
    other_seed = control_labels(dataset, seed=1)
    assert not all(np.array_equal(labels[name], other_seed[name]) for name in labels)


def test_control_labels_follow_the_training_label_distribution(rng):
    n = 20_000
    y = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    dataset = probecore.split_dataset(rng.normal(size=(n, 4)).astype(np.float32), y, seed=0)
    labels = np.concatenate(list(control_labels(dataset).values()))
    frequencies = np.bincount(labels, minlength=3) / n
    np.testing.assert_allclose(frequencies, [0.6, 0.3, 0.1], atol=0.015)
    assert np.mean(labels == np.concatenate([split.y for split in dataset.splits().values()])) < 0.5


def test_selectivity_is_high_for_a_layer_that_encodes_the_labels_and_low_for_one_that_memorizes(rng):
    dataset, _ = _repeated_inputs(rng)
    n_distinct = 240
    classes = np.zeros(n_distinct, np.int64)
    for split in dataset.splits().values():
        classes[split.x] = split.y
    centers = rng.normal(size=(3, 16)) * 3
    layers = {
        # the class and noise fixed per input: readable labels, nothing else to memorize
        "encodes": (centers[classes] + rng.normal(size=(n_distinct, 16))).astype(np.float32),
        # a random vector per input: no label information, but every input can be told apart
        "memorizes": rng.normal(size=(n_distinct, 400)).astype(np.float32),
    }
    source = probecore.ArraySource({name: values for name, values in layers.items()})
    report = probecore.run_probes(source, dataset, probecore.RunSpec(fit=probecore.FitOptions(l2=1e-4), control_task=True))
    by_name = {layer.name: layer for layer in report.layers}
    encodes, memorizes = by_name["encodes"], by_name["memorizes"]
    assert encodes.metrics["test"].error < 0.1 and encodes.selectivity > 0.4
    # the memorizing probe scores as well on random labels as on real ones: selectivity near zero
    assert memorizes.metrics["test"].error < 0.2 and abs(memorizes.selectivity) < 0.15
    assert memorizes.control["train"].error < 0.05
    assert report.settings["spec"]["control_task"] is True
    layer = report.to_dict()["layers"][0]
    assert layer["control"]["selectivity"] == pytest.approx(by_name[layer["name"]].selectivity)
    assert set(layer["control"]["metrics"]) == {"train", "valid", "test"}
