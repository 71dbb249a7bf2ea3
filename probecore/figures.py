"""The report's figures as PNG bytes (matplotlib, no window, loaded only when a figure is drawn).

``layer_errors_png``: probe error by layer with 95% intervals and the model's own error as a reference line
(paper Figure 4b); ``sweep_heatmap_png``: the layer x checkpoint grid of probe errors (paper Figure 9).
"""

from __future__ import annotations

import io

import numpy as np

from .report import ProbeReport


def layer_errors_png(report: ProbeReport, title: str = "Linear probe error by layer") -> bytes:
    from matplotlib.figure import Figure

    names = [layer.name for layer in report.layers]
    x = np.arange(len(names))
    test = np.array([100 * layer.metrics["test"].error for layer in report.layers])
    low, high = (np.array([100 * layer.metrics["test"].error_interval[i] for layer in report.layers]) for i in (0, 1))
    figure = Figure(figsize=(min(16.0, max(6.0, 0.35 * len(names) + 2)), 4.2), layout="constrained")
    axes = figure.add_subplot()
    for finding in report.diagnostics:
        if finding.kind == "dead_segment":
            span = [names.index(name) for name in finding.layers]
            axes.axvspan(min(span) - 0.4, max(span) + 0.4, color="#f4cccc", zorder=0,
                         label="dead segment" if not axes.patches else None)  # fmt: skip
    for split, style in (("train", ":"), ("valid", "--")):
        axes.plot(x, [100 * layer.metrics[split].error for layer in report.layers], style, color="grey", lw=1, label=split)
    axes.errorbar(x, test, yerr=[test - low, high - test], fmt="o-", color="#1f4e9c", ms=4, capsize=2,
                  label="test (95% interval)")  # fmt: skip
    if report.model_test is not None:
        axes.axhline(100 * report.model_test.error, color="#b03a2e", ls="--", lw=1,
                     label=f"model's own test error ({100 * report.model_test.error:.1f}%)")  # fmt: skip
    step = -(-len(names) // 40)  # at most 40 names on the axis
    axes.set_xticks(x[::step], names[::step], rotation=60 if len(names) > 6 else 0,
                    ha="right" if len(names) > 6 else "center", fontsize=8 if len(names) > 20 else 9)  # fmt: skip
    axes.set_ylabel("probe error (%)")
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def sweep_heatmap_png(sweep, title: str = "Linear probe test error by layer and checkpoint") -> bytes:
    from matplotlib.figure import Figure

    grid = 100 * sweep.grid("test")
    layers, checkpoints = sweep.layers, sweep.checkpoints
    size = (min(16.0, max(5.0, 0.5 * len(checkpoints) + 3)), min(12.0, max(3.5, 0.22 * len(layers) + 1.5)))
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis_r", interpolation="nearest")
    step = -(-len(layers) // 45)  # at most 45 names on the axis
    axes.set_yticks(range(0, len(layers), step), layers[::step], fontsize=8 if len(layers) > 20 else 9)
    axes.set_xticks(range(len(checkpoints)), checkpoints, rotation=45 if len(checkpoints) > 8 else 0, fontsize=8)
    axes.set_xlabel("checkpoint")
    axes.set_ylabel("layer (input at the top)")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="probe test error (%)")
    if grid.size <= 200:
        for (row, column), value in np.ndenumerate(grid):
            if not np.isnan(value):
                axes.text(column, row, f"{value:.{1 if grid.size <= 60 else 0}f}", ha="center", va="center", fontsize=7,
                          color="white" if value > np.nanmean(grid) else "black")  # fmt: skip
    return _png(figure)


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
