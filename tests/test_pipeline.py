"""The whole run on the bundled convnet and on ready arrays: results, model error, streaming."""

import tracemalloc

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import probecore
from probecore.backends.onnx_source import OnnxSource
from probecore.bundled import DEMO_DATA, DEMO_MODEL


@pytest.fixture(scope="module")
def demo():
    """The demo's report plus the same reduced features extracted again, shared by the tests below."""
    source = OnnxSource(DEMO_MODEL, device="cpu")
    dataset = probecore.load_dataset(DEMO_DATA)
    report = probecore.run_probes(source, dataset)
    chosen = probecore.select_layers(source.layers(), None)
    features = probecore.extract_features(source, dataset, chosen)
    return report, dataset, features


def test_probe_error_falls_from_input_to_last_hidden_layer(demo):
    report, _, _ = demo
    errors = {layer.name: layer.metrics["test"].error for layer in report.layers}
    assert errors["pixels"] > errors["relu3"] + 0.02


def test_every_layer_is_within_one_point_of_scikit_learn_on_the_same_features(demo):
    # scikit-learn at the strength probecore chose; it has no early stopping, so probecore may do better
    report, dataset, features = demo
    for layer in report.layers:
        by_split = features.by_layer[layer.name]
        assert by_split["train"].shape[1] == layer.n_features
        scaler = StandardScaler().fit(by_split["train"])
        reference = LogisticRegression(C=1 / (layer.l2 * len(dataset.train)), max_iter=2000)
        with threadpool_limits(1):  # uncapped, its threads wait on each other on a busy 2-core machine
            reference.fit(scaler.transform(by_split["train"]), dataset.train.y)
        reference_error = np.mean(reference.predict(scaler.transform(by_split["test"])) != dataset.test.y)
        assert layer.metrics["test"].error - reference_error <= 0.01, layer.name


def test_each_layer_keeps_the_strength_with_the_best_validation_loss(demo):
    report, _, _ = demo
    for layer in report.layers:
        path = layer.l2_path
        assert [point["l2"] for point in path] == list(probecore.FitOptions().l2_path[: len(path)])
        assert layer.l2 == min(path, key=lambda point: point["valid_loss"])["l2"]
        assert layer.n_iter == sum(point["iterations"] for point in path)


def test_the_models_own_test_error_is_reported(demo):
    report, dataset, features = demo
    assert report.model_output == "logits"
    logits = features.model_test_scores
    assert logits.shape == (len(dataset.test), 10)
    assert report.model_test.error == pytest.approx(np.mean(logits.argmax(axis=1) != dataset.test.y))
    assert report.model_test.error < 0.1


def test_report_records_how_the_run_was_made(demo):
    report, _, _ = demo
    settings = report.settings
    assert len(settings["source"]["model_sha256"]) == 64
    assert settings["source"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert settings["spec"]["policy"]["seed"] == 0 and tuple(settings["spec"]["fit"]["l2"]) == probecore.FitOptions().l2
    assert settings["seconds"]["fit"] > 0 and settings["spec"]["control_task"] is False
    assert {"numpy", "numba", "onnx"} <= set(settings["versions"])
    assert report.split_sizes == {"train": 3500, "valid": 500, "test": 1000}


def test_array_source_probes_precomputed_activations_with_string_labels(rng):
    n, n_classes = 900, 3
    labels = np.array(["cat", "dog", "owl"])[rng.integers(0, n_classes, n)]
    centers = rng.normal(size=(n_classes, 20)) * 3
    informative = centers[np.searchsorted(np.unique(labels), labels)] + rng.normal(size=(n, 20))
    noise = rng.normal(size=(n, 4, 5, 5))
    source = probecore.ArraySource({"noise": noise.astype(np.float32), "signal": informative.astype(np.float32)})
    dataset = probecore.split_dataset(np.arange(n), labels, seed=3)
    report = probecore.run_probes(source, dataset, probecore.RunSpec(policy=probecore.ReductionPolicy(max_features=50)))
    errors = {layer.name: layer.metrics["test"].error for layer in report.layers}
    assert errors["signal"] < 0.05 and errors["noise"] > 0.4
    assert report.classes == ["cat", "dog", "owl"]
    assert report.model_test is None
    assert report.layers[0].reduction["description"] == "avgpool 2x2"


class CountingSource(probecore.ArraySource):
    """Makes each batch's wide activations on the fly, as a model would, and counts the batches."""

    def __init__(self, n_samples, width, n_classes, rng):
        super().__init__({"wide": np.zeros((n_samples, 1), np.float32)})
        self.width, self.batches, self.rng = width, [], rng
        self.directions = rng.normal(size=(n_classes, width)).astype(np.float32)
        self.labels = rng.integers(0, n_classes, n_samples)

    def layers(self):
        return [probecore.LayerInfo("wide", "Array", (self.width,))]

    def activations(self, x, layer_names, batch_size):
        for start in range(0, len(x), batch_size):
            rows = x[start : start + batch_size]
            self.batches.append(len(rows))
            wide = self.directions[self.labels[rows]] + self.rng.normal(size=(len(rows), self.width)).astype(np.float32)
            yield {"wide": wide}


def test_unreduced_activations_are_never_held_whole(rng):
    n_samples, width = 3000, 8192  # 98 MB of float32 activations if they were held at once
    source = CountingSource(n_samples, width, 4, rng)
    dataset = probecore.split_dataset(np.arange(n_samples), source.labels, seed=0)
    chosen = source.layers()
    tracemalloc.start()
    spec = probecore.RunSpec(policy=probecore.ReductionPolicy(max_features=64), batch_size=100)
    features = probecore.extract_features(source, dataset, chosen, spec)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert max(source.batches) <= 100 and sum(source.batches) == n_samples
    assert features.by_layer["wide"]["train"].shape == (len(dataset.train), 64)
    assert peak < 20e6, f"peak {peak / 1e6:.0f} MB"
