"""A self-contained HTML report: the model drawn as the chain of its probed layers, each colored by its probe's
test error (paper Figure 5), the diagnostics, the figures (embedded) and the table. One file, no scripts,
nothing fetched."""

from __future__ import annotations

import base64
from html import escape

from .report import MODEL_ERROR_NOTE, ProbeReport

PER_ROW = 6
BOX_W, BOX_H, GAP_X, GAP_Y = 150, 58, 34, 30
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td:nth-child(2) { text-align: left; }
tr.best td { font-weight: bold; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; margin: 0.3em 0; }
.muted { color: #666; font-size: 0.9em; }
"""


def report_html(report: ProbeReport, figures: dict[str, bytes] | None = None, title: str = "probecore report") -> str:
    """The whole report as one HTML page; ``figures`` (caption -> PNG bytes) are embedded as data URLs."""
    parts = [f"<h1>{escape(title)}</h1>", _summary(report), "<h2>Probed layers, in model order</h2>", chain_svg(report)]
    findings = report.diagnostics
    parts += ["<h2>Diagnostics</h2>", _notes(findings)]
    if not findings:
        parts.append('<p class="muted">No step back in depth, dead segment or overfitting probe.</p>')
    for caption, png in (figures or {}).items():
        parts.append(f"<h2>{escape(caption)}</h2>{image_tag(png, caption)}")
    parts += ["<h2>Table</h2>", _table(report)]
    return page(title, "\n".join(parts))


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")  # fmt: skip


def image_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def chain_svg(report: ProbeReport) -> str:
    """Boxes in model order, left to right in rows, filled from green (lowest test error in this report) to
    red (highest); each names the layer, its kind and its test error."""
    errors = [layer.metrics["test"].error for layer in report.layers]
    low, high = min(errors), max(errors)
    rows = -(-len(errors) // PER_ROW)
    width = PER_ROW * BOX_W + (PER_ROW - 1) * GAP_X + 20
    height = rows * BOX_H + (rows - 1) * GAP_Y + 20
    shapes = []
    for index, layer in enumerate(report.layers):
        row, column = divmod(index, PER_ROW)
        x, y = 10 + column * (BOX_W + GAP_X), 10 + row * (BOX_H + GAP_Y)
        share = 0.0 if high == low else (errors[index] - low) / (high - low)
        shapes.append(
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{_color(share)}" stroke="#555">'
            f"<title>{escape(layer.name)}: test error {100 * errors[index]:.2f}%</title></rect>"
            f'<text x="{x + BOX_W / 2}" y="{y + 19}" text-anchor="middle" font-size="12" font-weight="bold">'
            f"{escape(_short(layer.name))}</text>"
            f'<text x="{x + BOX_W / 2}" y="{y + 35}" text-anchor="middle" font-size="11">{escape(_short(layer.op_type))}</text>'
            f'<text x="{x + BOX_W / 2}" y="{y + 51}" text-anchor="middle" font-size="12">{100 * errors[index]:.1f}%</text>'
        )  # fmt: skip
        if index + 1 < len(report.layers):
            if column + 1 < PER_ROW:
                ax, ay = x + BOX_W, y + BOX_H / 2
                shapes.append(f'<line x1="{ax}" y1="{ay}" x2="{ax + GAP_X - 4}" y2="{ay}" stroke="#555" marker-end="url(#arrow)"/>')
            else:  # down to the next row's first box
                shapes.append(
                    f'<path d="M{x + BOX_W / 2},{y + BOX_H} V{y + BOX_H + GAP_Y / 2} H{10 + BOX_W / 2} '
                    f'V{y + BOX_H + GAP_Y - 4}" fill="none" stroke="#555" marker-end="url(#arrow)"/>'
                )  # fmt: skip
    marker = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
              'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>')  # fmt: skip
    legend = (f'<p class="muted">Fill: test error, green = {100 * low:.1f}% (lowest here) to red = '
              f"{100 * high:.1f}% (highest).</p>")  # fmt: skip
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{marker}{"".join(shapes)}</svg>{legend}'


def _notes(findings) -> str:
    return "".join(f'<div class="note"><b>{escape(f.kind.replace("_", " "))}</b>: {escape(f.message)}</div>' for f in findings)


def _color(share: float) -> str:
    """Green (0) through yellow to red (1)."""
    red = int(255 * min(1.0, 2 * share)) if share < 0.5 else 255
    green = 200 if share < 0.5 else int(200 * (2 - 2 * share))
    return f"rgb({max(red, 90)},{max(green, 60)},90)"


def _short(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _summary(report: ProbeReport) -> str:
    sizes = ", ".join(f"{name} {size}" for name, size in report.split_sizes.items())
    model = report.settings.get("source", {}).get("model", "")
    line = f"{len(report.layers)} layers, {len(report.classes)} classes, samples: {sizes}"
    if report.model_test is not None:
        error = 100 * report.model_test.error
        line += f"; model's own error on the test split ({escape(str(report.model_output))}): {error:.1f}% ({MODEL_ERROR_NOTE})"
    return f'<p>{escape(str(model))}</p><p class="muted">{line}</p>'


def _table(report: ProbeReport) -> str:
    head = ["layer", "op", "shape", "features", "reduction", "l2", "error % train", "valid", "test", "test 95% CI"]
    has_control = any(layer.control is not None for layer in report.layers)
    if has_control:
        head.append("selectivity")
    best = min(layer.metrics["test"].error for layer in report.layers)
    rows = []
    for layer in report.layers:
        low, high = layer.metrics["test"].error_interval
        cells = [layer.name, layer.op_type, "x".join(map(str, layer.shape)), str(layer.n_features),
                 layer.reduction["description"], "" if layer.l2 is None else f"{layer.l2:.0e}",
                 *(f"{100 * layer.metrics[s].error:.1f}" for s in ("train", "valid", "test")),
                 f"{100 * low:.1f}-{100 * high:.1f}"]  # fmt: skip
        if has_control:
            cells.append("" if layer.selectivity is None else f"{100 * layer.selectivity:.1f}")
        css = ' class="best"' if layer.metrics["test"].error == best else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def sweep_html(sweep, heatmap_png: bytes, last_png: bytes, title: str = "probecore sweep") -> str:
    """A sweep as one page: the layer x checkpoint heatmap, its grid, and the last checkpoint's report."""
    grid = sweep.grid("test")
    head = "".join(f"<th>{escape(c)}</th>" for c in ["layer", *sweep.checkpoints])
    rows = "".join(
        f"<tr><td>{escape(name)}</td>" + "".join(f"<td>{'' if v != v else f'{100 * v:.1f}'}</td>" for v in row) + "</tr>"
        for name, row in zip(sweep.layers, grid)
    )  # fmt: skip
    last = sweep.reports[-1]
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="muted">{len(sweep.checkpoints)} checkpoints, {len(sweep.layers)} layers; test error in %.</p>',
        image_tag(heatmap_png, "layer x checkpoint heatmap"),
        f"<h2>Test error grid</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>",
        f"<h2>Last checkpoint: {escape(sweep.checkpoints[-1])}</h2>",
        chain_svg(last),
        _notes(last.diagnostics),
        image_tag(last_png, "probe error by layer, last checkpoint"),
        _table(last),
    ]
    return page(title, "\n".join(body))
