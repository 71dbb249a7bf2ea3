"""Diagnostics on planted reports: a dead segment, a step back in depth and an overfitting probe are flagged;
a monotonic report and noise-level wiggles are not."""

import json

from probecore.diagnostics import DiagnosticOptions, diagnose
from probecore.report import LayerResult, ProbeReport
from probecore.softmax import SplitMetrics


def metrics(test_error, n=1000, train_error=None, valid_error=None):
    train = test_error if train_error is None else train_error
    valid = test_error if valid_error is None else valid_error
    return {"train": SplitMetrics(4 * n, 0.5, train, None), "valid": SplitMetrics(n, 0.5, valid, None),
            "test": SplitMetrics(n, 0.5, test_error, None)}  # fmt: skip


def findings(test_errors, n=1000, **options):
    names = [f"layer{i}" for i in range(len(test_errors))]
    return diagnose(names, [metrics(e, n) for e in test_errors], DiagnosticOptions(**options))


def test_a_monotonic_report_is_not_flagged():
    assert findings([0.40, 0.30, 0.22, 0.15, 0.11, 0.08, 0.07]) == []


def test_noise_level_wiggles_are_not_flagged():
    # steps of under a point on 500 test samples are within the 95% intervals
    assert findings([0.10, 0.105, 0.098, 0.104, 0.097, 0.1], n=500) == []


def test_a_planted_dead_segment_is_flagged_with_its_layers():
    found = findings([0.30, 0.31, 0.30, 0.32, 0.31, 0.05, 0.04])
    dead = [f for f in found if f.kind == "dead_segment"]
    assert len(dead) == 1
    assert dead[0].layers == ("layer1", "layer2", "layer3", "layer4")  # the layers after layer0 that add nothing
    assert "does not improve on layer0's 30.0% along them, while layer5 reaches 5.0%" in dead[0].message


def test_a_dead_segment_worse_than_its_entry_is_flagged_even_when_the_rescue_only_matches_the_entry():
    # the paper's pathological network: the input reads the labels well, the first half loses them, the
    # second half (fed by a skip from the input) reads them about as well as the input again
    found = findings([0.10, 0.14, 0.30, 0.60, 0.80, 0.09, 0.09])
    assert [(f.kind, f.layers) for f in found if f.kind == "dead_segment"] == [
        ("dead_segment", ("layer1", "layer2", "layer3", "layer4"))
    ]


def test_a_flat_stretch_that_nothing_later_beats_is_not_a_dead_segment():
    assert [f for f in findings([0.30, 0.20, 0.20, 0.20, 0.20, 0.20]) if f.kind == "dead_segment"] == []


def test_a_short_flat_stretch_is_not_a_dead_segment():
    assert [f.kind for f in findings([0.30, 0.30, 0.05], min_run=3)] == []


def test_a_step_back_beyond_the_intervals_is_flagged_once_per_stretch():
    found = findings([0.10, 0.05, 0.20, 0.22, 0.04])
    assert [(f.kind, f.layers) for f in found] == [("non_monotonic", ("layer1", "layer2", "layer3"))]
    assert found[0].message.startswith("layer2 .. layer3 (2 layers) read the labels worse than the earlier layer1")


def test_an_overfitting_probe_is_flagged():
    names = ["a", "b"]
    found = diagnose(names, [metrics(0.2, train_error=0.0, valid_error=0.25), metrics(0.15, train_error=0.1, valid_error=0.15)])
    assert [(f.kind, f.layers) for f in found] == [("overfit", ("a",))]
    assert "train error 0.0%, valid 25.0%" in found[0].message
    several = diagnose(["a", "b", "c"], [metrics(0.2, train_error=0.0, valid_error=0.25)] * 2 + [metrics(0.1)])
    assert [(f.kind, f.layers) for f in several] == [("overfit", ("a", "b"))]
    assert several[0].message.startswith("a .. b (2 layers): the probe overfits")


def planted_report() -> ProbeReport:
    """Five layers, the middle three a dead segment (also used by test_sweep.py)."""
    layers = [
        LayerResult(f"layer{i}", "Relu", (4,), {"features_in": 4, "features_out": 4, "description": "none"},
                    metrics(error), 10, "converged", 0.1, 1e-3, [], None)
        for i, error in enumerate([0.30, 0.31, 0.30, 0.32, 0.05])
    ]  # fmt: skip
    return ProbeReport(layers, [0, 1], {"train": 4000, "valid": 1000, "test": 1000})


def test_reports_carry_their_diagnostics_and_read_back_from_json():
    data = json.loads(planted_report().to_json())
    assert [d["kind"] for d in data["diagnostics"]] == ["dead_segment"]
    assert data["diagnostics"][0]["layers"] == ["layer1", "layer2", "layer3"]
    again = ProbeReport.from_dict(data)
    assert again.to_dict() == data
