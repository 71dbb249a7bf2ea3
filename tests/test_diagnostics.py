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


def skip_graph(n_layers, fork, join, branches=()):
    """A chain of layers with a skip from ``fork`` straight to ``join``, so the layers between lie on one path
    around which the skip goes (fork and join on the main path, the layers between on a branch); ``branches``:
    more (layer, parent) edges, e.g. a second path from the fork to the join."""
    graph = []
    for i in range(n_layers):
        parents = [f"layer{i - 1}"] if i else []
        if i == join:
            parents.append(f"layer{fork}")
        parents += [f"layer{parent}" for layer, parent in branches if layer == i]
        graph.append(("main" if i <= fork or i >= join else "branch", parents))
    return graph


def graph_findings(test_errors, graph, n=1000):
    names = [f"layer{i}" for i in range(len(test_errors))]
    return diagnose(names, [metrics(e, n) for e in test_errors], graph=graph)


def test_a_planted_dead_segment_is_flagged_with_its_layers():
    found = graph_findings([0.30, 0.31, 0.30, 0.32, 0.31, 0.29, 0.04], skip_graph(7, fork=0, join=5))
    assert [(f.kind, f.layers) for f in found] == [("dead_segment", ("layer1", "layer2", "layer3", "layer4"))]
    assert "does not improve on layer0's 30.0% along them, while layer6, past the skip from layer0" in found[0].message
    assert "the labels go around these layers, not through them" in found[0].message


def test_the_papers_dead_half_is_flagged_though_the_rescue_only_matches_the_input():
    # the paper's pathological network: the input reads the labels well, the first half loses them, the
    # second half (fed by a skip from the input) reads them about as well as the input again, no better
    found = graph_findings([0.109, 0.14, 0.30, 0.60, 0.80, 0.114, 0.094], skip_graph(7, fork=0, join=5))
    assert [(f.kind, f.layers) for f in found] == [("dead_segment", ("layer1", "layer2", "layer3", "layer4"))]
    # after 500 steps: the first layer of the run is nearly as good as the input, nothing beats it beyond the
    # intervals; the join still recovers what the end of the run lost
    early = graph_findings([0.103, 0.146, 0.47, 0.77, 0.774, 0.114, 0.121], skip_graph(7, fork=0, join=5))
    assert [(f.kind, f.layers) for f in early] == [("dead_segment", ("layer1", "layer2", "layer3", "layer4"))]


def test_a_residual_branch_whose_join_improves_on_the_fork_is_healthy():
    # the layers inside read worse than the block input (a residual is a correction, not a representation),
    # but the block adds what they computed: nothing is dead
    assert graph_findings([0.30, 0.35, 0.40, 0.38, 0.10, 0.08], skip_graph(6, fork=0, join=4)) == []


def test_a_plateau_in_a_chain_is_no_dead_segment():
    # without a skip, nothing went around the flat layers: deeper layers improving later is ordinary depth
    assert [f.kind for f in findings([0.30, 0.31, 0.30, 0.32, 0.31, 0.05, 0.04])] == []


def test_parallel_branches_are_not_one_path():
    # an Inception-style module: two paths from the fork to the join (layer1..3 and layer4)
    graph = skip_graph(6, fork=0, join=5, branches=[(4, 0)])
    graph[4] = ("branch", ["layer0"])  # layer4 reads the fork, not layer3
    graph[5] = ("main", ["layer3", "layer4"])
    assert graph_findings([0.30, 0.31, 0.30, 0.32, 0.45, 0.29], graph) == []


def test_branch_and_side_layers_are_not_held_to_their_ancestors():
    # layer1 and layer2 are a residual branch, layer3 a gate: far worse than the input, as partial signals are
    graph = [("main", []), ("branch", ["layer0"]), ("branch", ["layer1"]), ("side", ["layer0"]),
             ("main", ["layer2", "layer0", "layer3"])]  # fmt: skip
    assert graph_findings([0.10, 0.40, 0.45, 0.50, 0.09], graph) == []
    worse_join = graph_findings([0.10, 0.40, 0.45, 0.50, 0.20], graph)
    assert [(f.kind, f.layers) for f in worse_join] == [("non_monotonic", ("layer0", "layer4"))]


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
    """Six layers, the middle three a dead segment that a skip from layer0 to layer4 goes around (also used by
    test_sweep.py)."""
    layers = [
        LayerResult(f"layer{i}", "Relu", (4,), {"features_in": 4, "features_out": 4, "description": "none"},
                    metrics(error), 10, "converged", 0.1, 1e-3, [], None, role=role, parents=parents)
        for i, (error, (role, parents)) in enumerate(zip([0.30, 0.31, 0.30, 0.32, 0.29, 0.05], skip_graph(6, 0, 4)))
    ]  # fmt: skip
    return ProbeReport(layers, [0, 1], {"train": 4000, "valid": 1000, "test": 1000})


def test_reports_carry_their_diagnostics_and_read_back_from_json():
    data = json.loads(planted_report().to_json())
    assert [d["kind"] for d in data["diagnostics"]] == ["dead_segment"]
    assert data["diagnostics"][0]["layers"] == ["layer1", "layer2", "layer3"]
    again = ProbeReport.from_dict(data)
    assert again.to_dict() == data
