"""errors.png and heatmap.png stay legible from 5 to 200 layers and 2 to 50 checkpoints: every layer and
checkpoint named once, no two names overlapping, inside the figure; layers off the main path drawn apart."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from probecore.figures import NAME_CHARS, layer_errors_figure, path_edges, sweep_heatmap_figure
from probecore.labels import shorten_middle
from probecore.report import LayerResult, ProbeReport
from probecore.softmax import SplitMetrics
from probecore.sweep import SweepReport


def branchy_report(rng, n_layers) -> ProbeReport:
    """A generated model of ``n_layers``: a main path of blocks named as torch names a transformer's (some
    far longer than an axis label); every fourth block a residual branch of three layers, added to the skip
    around it, and every fourth a side gate that the next block multiplies in; random errors."""
    layers, previous, extra_parent = [], None, []
    reduction = {"features_in": 64, "features_out": 64, "description": "none"}

    def add(name, role, parents):
        error = rng.uniform(0.02, 0.9)
        metrics = {split: SplitMetrics(1000, 1.0, float(np.clip(error + shift, 0, 1)), None)
                   for split, shift in (("train", -0.02), ("valid", 0.01), ("test", 0.0))}  # fmt: skip
        layers.append(LayerResult(name, "Relu", (64,), reduction, metrics, 10, "converged", 0.1, 1e-3, role=role, parents=parents))

    for block in range(n_layers):
        if block % 4 == 1:
            branch = [f"encoder.layer.{block}.attention.output.dense.branch{i}" for i in range(3)]
            for index, name in enumerate(branch):
                add(name, "branch", [branch[index - 1]] if index else [previous])
            add(f"add_{block}", "main", [previous, branch[-1]])
        elif block % 4 == 3:
            add(f"blocks.{block}.se.gate", "side", [previous])
            extra_parent = [f"blocks.{block}.se.gate"]
            continue
        else:
            add(f"layer{block}" if block % 3 else f"encoder.layer.{block}.output", "main", [previous, *extra_parent] if previous else [])
        previous, extra_parent = layers[-1].name, []
    del layers[n_layers:]
    return ProbeReport(layers, list(range(10)), {"train": 4000, "valid": 1000, "test": 1000})


def drawn(figure):
    FigureCanvasAgg(figure)
    figure.canvas.draw()
    return figure.canvas.get_renderer()


def assert_named_once_without_overlap(figure, renderer, labels, expected):
    texts = [label.get_text() for label in labels]
    assert texts == expected
    assert min(label.get_fontsize() for label in labels) >= 7
    boxes = [label.get_window_extent(renderer) for label in labels]
    inside = figure.bbox
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)
    edges = np.array([[b.x0, b.x1, b.y0, b.y1] for b in boxes])
    for index, (x0, x1, y0, y1) in enumerate(edges):
        others = np.delete(edges, index, axis=0)
        overlap = (others[:, 0] < x1 - 0.5) & (others[:, 1] > x0 + 0.5) & (others[:, 2] < y1 - 0.5) & (others[:, 3] > y0 + 0.5)
        assert not overlap.any(), f"{texts[index]} overlaps another label"


@pytest.mark.parametrize("n_layers", [5, 81, 200])
def test_errors_figure_names_every_layer_without_overlap(rng, n_layers):
    report = branchy_report(rng, n_layers)
    figure = layer_errors_figure(report)
    renderer = drawn(figure)
    labels = [label for axes in figure.axes for label in axes.get_xticklabels()]
    expected = [shorten_middle(layer.name, NAME_CHARS) for layer in report.layers]
    assert len(set(expected)) == n_layers  # shortened, the names still tell the blocks apart
    assert_named_once_without_overlap(figure, renderer, labels, expected)
    assert max(figure.get_size_inches()) < 30


@pytest.mark.parametrize("n_layers, n_checkpoints", [(5, 2), (81, 50), (200, 2), (200, 50)])
def test_heatmap_names_every_layer_and_checkpoint_without_overlap(rng, n_layers, n_checkpoints):
    checkpoints = [f"epoch{i // 10}_step{1000 * i}" if n_checkpoints > 2 else f"ckpt_{i}" for i in range(n_checkpoints)]
    sweep = SweepReport(checkpoints, [branchy_report(rng, n_layers) for _ in checkpoints])
    figure = sweep_heatmap_figure(sweep)
    renderer = drawn(figure)
    heatmaps = [axes for axes in figure.axes if axes.images and axes.get_label() != "<colorbar>"]
    layer_labels = [label for axes in heatmaps for label in axes.get_yticklabels()]
    checkpoint_labels = [label for axes in heatmaps for label in axes.get_xticklabels()]
    assert_named_once_without_overlap(figure, renderer, layer_labels + checkpoint_labels,
                                      [shorten_middle(name, NAME_CHARS) for name in sweep.layers] + checkpoints * len(heatmaps))  # fmt: skip
    assert max(figure.get_size_inches()) < 30


def test_branch_and_side_layers_are_drawn_apart_from_the_main_path(rng):
    report = branchy_report(rng, 30)
    roles = {index: layer.role for index, layer in enumerate(report.layers)}
    figure = layer_errors_figure(report)
    lines = {collection.get_gid(): collection for collection in figure.axes[0].collections if collection.get_gid()}
    edges = path_edges(report)
    for role in ("main", "branch", "side"):
        starts = [segment[0][0] for segment in lines[f"test-{role}"].get_segments()]
        ends = [segment[1][0] for segment in lines[f"test-{role}"].get_segments()]
        assert [(a, b) for a, b in zip(starts, ends)] == edges[role] and edges[role]
        assert all(roles[b] == role for b in ends)
    assert all(roles[a] == "main" for a, _ in edges["main"])  # the main path's line skips the branches
    position = {layer.name: index for index, layer in enumerate(report.layers)}
    for a, b in edges["branch"] + edges["side"]:
        assert report.layers[a].name in report.layers[b].parents and position[report.layers[a].name] == a
