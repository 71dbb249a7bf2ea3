"""The report's figures as PNG bytes (matplotlib, no window, loaded only when a figure is drawn).

``layer_errors_png``: probe error by layer with 95% intervals and the model's own error as a reference line
(paper Figure 4b); ``sweep_heatmap_png``: the layer x checkpoint grid of probe errors (paper Figure 9).

Every layer and every checkpoint is named on the axes, whatever their number: past ``LAYERS_PER_PANEL``
layers (``ROWS_PER_PANEL`` in the heatmap) the figure is split into panels, each naming all of its own, and
the figure grows with the count. Names longer than ``NAME_CHARS`` are shortened in the middle (the full
names are in report.json and report.html). Layers off the main path are drawn apart: branch layers (inside a
block, around a skip) and side branches (gates, attention scores) in their own colours, joined to the layers
they are computed from, never to the main path's line.
"""

from __future__ import annotations

import io

import numpy as np

from .labels import shorten_middle
from .report import SPLIT_NAMES, ProbeReport, layer_roles

LAYERS_PER_PANEL = 50  # errors.png: layers named on one axis
ROWS_PER_PANEL = 100  # heatmap.png: layers named down one panel
NAME_CHARS = 24  # a longer name is shortened in the middle on the axes
CHECKPOINT_CHARS = 16
FONT_SIZE = 7  # tick labels, in points; the figure is sized so that labels at this size never overlap
PITCH = 0.16  # inches per named layer or checkpoint along an axis: a 7-point label and a gap
CHAR_INCHES = 0.062  # one character of a 7-point label
ROLE_STYLE = {  # role -> (colour, marker, legend label)
    "main": ("#1f4e9c", "o", "test, main path (95% interval)"),
    "branch": ("#d9730d", "s", "test, branch: inside a block or around a skip"),
    "side": ("#8e44ad", "D", "test, side branch: a gate, attention scores"),
}


def layer_errors_png(report: ProbeReport, title: str = "Linear probe error by layer") -> bytes:
    return _png(layer_errors_figure(report, title))


def sweep_heatmap_png(sweep, title: str = "Linear probe test error by layer and checkpoint") -> bytes:
    return _png(sweep_heatmap_figure(sweep, title))


def panels(count: int, most: int) -> list[range]:
    """``range(count)`` cut into the fewest consecutive parts of at most ``most``, as equal as can be."""
    parts = max(1, -(-count // most))
    bounds = np.linspace(0, count, parts + 1).round().astype(int)
    return [range(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def path_edges(report: ProbeReport) -> dict[str, list[tuple[int, int]]]:
    """The lines to draw, by role of the layer they lead to: each main-path layer from the main-path layer
    before it; each branch or side layer from the probed layers it is computed from."""
    roles = layer_roles(report.layers)
    position = {layer.name: index for index, layer in enumerate(report.layers)}
    edges: dict[str, list[tuple[int, int]]] = {"main": [], "branch": [], "side": []}
    previous_main = None
    for index, (layer, role) in enumerate(zip(report.layers, roles)):
        if role == "main":
            if previous_main is not None:
                edges["main"].append((previous_main, index))
            previous_main = index
        else:
            edges[role] += [(position[parent], index) for parent in layer.parents if parent in position]
    return edges


def layer_errors_figure(report: ProbeReport, title: str = "Linear probe error by layer"):
    from matplotlib.figure import Figure

    labels = [shorten_middle(layer.name, NAME_CHARS) for layer in report.layers]
    parts = panels(len(labels), LAYERS_PER_PANEL)
    width = max(6.5, PITCH * max(len(part) for part in parts) + 2.0)
    label_height = CHAR_INCHES * max(map(len, labels)) + 0.2
    figure = Figure(figsize=(width, len(parts) * (2.6 + label_height) + 0.5), layout="constrained")
    every_axes = figure.subplots(len(parts), 1, sharey=True, squeeze=False)[:, 0]
    errors = {split: np.array([100 * layer.metrics[split].error for layer in report.layers]) for split in SPLIT_NAMES}
    bounds = np.array([[100 * bound for bound in layer.metrics["test"].error_interval] for layer in report.layers])
    roles, edges, findings = layer_roles(report.layers), path_edges(report), report.diagnostics
    rotate = len(labels) > 6 or max(map(len, labels)) > 12
    for axes, part in zip(every_axes, parts):
        _draw_errors(axes, report, errors, bounds, roles, edges, findings)
        _name_ticks(axes.xaxis, part, labels, roles, rotation=90 if rotate else 0, fontsize=FONT_SIZE + (0 if rotate else 2))
        axes.set_xlim(part.start - 0.6, part.stop - 0.4)
        axes.set_ylabel("probe error (%)")
        axes.grid(axis="y", alpha=0.3)
        if len(parts) > 1:
            axes.set_title(f"layers {part.start + 1}-{part.stop} of {len(labels)}", fontsize=9, loc="left")
    every_axes[0].set_ylim(bottom=0, top=max(5.0, 1.08 * max(bounds.max(), errors["train"].max(), errors["valid"].max())))
    handles, legend_labels = every_axes[0].get_legend_handles_labels()
    unique = dict(zip(legend_labels, handles))  # one "dead segment" entry for several spans
    every_axes[0].legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1),
                         borderaxespad=0)  # fmt: skip
    figure.suptitle(title)
    return figure


def _draw_errors(axes, report, errors, bounds, roles, edges, findings) -> None:
    """One panel of errors.png: dead segments shaded, train and valid errors as grey lines, test errors with
    their intervals, each role in its colour and joined along its own edges, the model's own error."""
    from matplotlib.collections import LineCollection

    names = [layer.name for layer in report.layers]
    for finding in findings:
        if finding.kind == "dead_segment":
            span = [names.index(name) for name in finding.layers]
            axes.axvspan(min(span) - 0.4, max(span) + 0.4, color="#f4cccc", zorder=0, label="dead segment")
    every_edge = [edge for role_edges in edges.values() for edge in role_edges]
    for split, style in (("train", ":"), ("valid", "--")):
        segments = [[(a, errors[split][a]), (b, errors[split][b])] for a, b in every_edge]
        axes.add_collection(LineCollection(segments, colors="grey", linestyles=style, linewidths=1, label=split))
    for role, (color, marker, label) in ROLE_STYLE.items():
        members = [i for i, r in enumerate(roles) if r == role]
        if not members:
            continue
        segments = [[(a, errors["test"][a]), (b, errors["test"][b])] for a, b in edges[role]]
        width = 1.4 if role == "main" else 1
        axes.add_collection(LineCollection(segments, colors=color, linewidths=width, gid=f"test-{role}"))
        test = errors["test"][members]
        axes.errorbar(members, test, yerr=[test - bounds[members, 0], bounds[members, 1] - test], fmt=marker, color=color,
                      ms=3.5 if len(names) > 30 else 4.5, capsize=1.5, lw=0.8, label=label)  # fmt: skip
    if report.model_test is not None:
        axes.axhline(100 * report.model_test.error, color="#b03a2e", ls="--", lw=1,
                     label=f"model's own test error ({100 * report.model_test.error:.1f}%)")  # fmt: skip


def _name_ticks(axis, part: range, labels: list[str], roles: list[str], **text) -> None:
    """A tick and a label for every layer of ``part``; off the main path, the label in its role's colour."""
    axis.set_ticks(list(part), [labels[i] for i in part], **text)
    for tick, index in zip(axis.get_ticklabels(), part):
        tick.set_color(ROLE_STYLE[roles[index]][0] if roles[index] != "main" else "black")


def sweep_heatmap_figure(sweep, title: str = "Linear probe test error by layer and checkpoint"):
    from matplotlib.figure import Figure

    grid = 100 * sweep.grid("test")
    layers, checkpoints = sweep.layers, sweep.checkpoints
    roles = _sweep_roles(sweep)
    layer_labels = [shorten_middle(name, NAME_CHARS) for name in layers]
    checkpoint_labels = [shorten_middle(name, CHECKPOINT_CHARS) for name in checkpoints]
    parts = panels(len(layers), ROWS_PER_PANEL)
    rows = max(len(part) for part in parts)
    row_height = max(PITCH, min(0.35, 3.0 / rows))
    column_width = max(PITCH, min(0.7, 6.0 / len(checkpoints)))
    rotate = CHAR_INCHES * max(map(len, checkpoint_labels)) > 0.9 * column_width
    names_width = CHAR_INCHES * max(map(len, layer_labels)) + 0.5
    checkpoint_height = CHAR_INCHES * max(map(len, checkpoint_labels)) + 0.3 if rotate else 0.3
    size = (len(parts) * (names_width + column_width * len(checkpoints) + 0.2) + 1.4,
            max(3.5, row_height * rows + checkpoint_height + 1.3))  # fmt: skip
    figure = Figure(figsize=size, layout="constrained")
    every_axes = figure.subplots(1, len(parts), squeeze=False)[0]
    shown = np.ma.masked_invalid(grid)
    limits = (np.nanmin(grid), np.nanmax(grid)) if np.isfinite(grid).any() else (0, 100)
    for axes, part in zip(every_axes, parts):
        extent = (-0.5, len(checkpoints) - 0.5, part.stop - 0.5, part.start - 0.5)  # rows numbered as layers
        image = axes.imshow(shown[part.start : part.stop], aspect="auto", cmap="viridis_r", interpolation="nearest",
                            vmin=limits[0], vmax=limits[1], extent=extent)  # fmt: skip
        _name_ticks(axes.yaxis, part, layer_labels, roles, fontsize=FONT_SIZE)
        axes.set_xticks(range(len(checkpoints)), checkpoint_labels, rotation=90 if rotate else 0, fontsize=FONT_SIZE)
        axes.set_xlabel("checkpoint")
        if len(parts) > 1:
            axes.set_title(f"layers {part.start + 1}-{part.stop} of {len(layers)}", fontsize=9, loc="left")
        if grid.size <= 200 and column_width >= 0.4:  # room for each cell's number
            _write_values(axes, grid, part, limits)
    every_axes[0].set_ylabel("layer (input at the top)")
    figure.colorbar(image, ax=list(every_axes), label="probe test error (%)", fraction=0.04 if len(parts) > 1 else 0.15)
    if any(role != "main" for role in roles):
        title += "\nlayer names: black main path, orange branch, purple side branch"
    figure.suptitle(title, fontsize=10)
    return figure


def _write_values(axes, grid, part: range, limits) -> None:
    """Each cell's error in it, white on the dark half of the colour scale (viridis_r: the higher errors)."""
    for row in part:
        for column, value in enumerate(grid[row]):
            if not np.isnan(value):
                color = "white" if value > (limits[0] + limits[1]) / 2 else "black"
                text = f"{value:.{1 if grid.size <= 60 else 0}f}"
                axes.text(column, row, text, ha="center", va="center", fontsize=7, color=color)


def _sweep_roles(sweep) -> list[str]:
    """Each of the sweep's layers' role, as the last checkpoint that probed it gives it."""
    role = {}
    for report in sweep.reports:
        role.update(zip((layer.name for layer in report.layers), layer_roles(report.layers)))
    return [role[name] for name in sweep.layers]


def _png(figure) -> bytes:
    """The figure as a 256-colour PNG: a third of the size of matplotlib's full-colour one, which report.html
    embeds (base64) and docs/ keeps, and no visible difference on a plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    FigureCanvasAgg(figure)
    drawn = io.BytesIO()
    figure.savefig(drawn, format="png", dpi=110)
    drawn.seek(0)
    buffer = io.BytesIO()
    Image.open(drawn).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()
