"""The files that show a report or a sweep: PNG figures and a self-contained HTML page, ready to write."""

from __future__ import annotations

from pathlib import PurePath

from .figures import layer_errors_png, sweep_heatmap_png
from .html_report import report_html, sweep_html
from .report import ProbeReport


def report_figures(report: ProbeReport) -> dict[str, bytes | str]:
    """errors.png (probe error by layer, Fig 4b) and report.html (the chain of layers, Fig 5, and the table)."""
    errors = layer_errors_png(report)
    model = report.settings.get("source", {}).get("model")
    title = f"probecore: {PurePath(model).name}" if model else "probecore report"  # the full path is on the page
    return {"errors.png": errors, "report.html": report_html(report, {"Probe error by layer": errors}, title)}


def sweep_figures(sweep) -> dict[str, bytes | str]:
    """heatmap.png (layer x checkpoint, Fig 9), errors_last.png and report.html."""
    heatmap = sweep_heatmap_png(sweep)
    last = layer_errors_png(sweep.reports[-1], f"Linear probe error by layer, checkpoint {sweep.checkpoints[-1]}")
    return {"heatmap.png": heatmap, "errors_last.png": last, "report.html": sweep_html(sweep, heatmap, last)}
