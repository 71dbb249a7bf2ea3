"""A self-contained HTML report: the model drawn as the chain of its probed layers, each colored by its probe's
test error (paper Figure 5), the diagnostics, the figures (embedded) and a sortable table; a sweep's page adds
the layer x checkpoint grid. Hovering or clicking a layer anywhere shows its details. One file: inline SVG,
plain JavaScript (``report.js``) and the numbers in a JSON block that the script reads; nothing fetched."""

from __future__ import annotations

import base64
import json
from html import escape
from importlib.resources import files

from .labels import shorten_middle
from .report import MODEL_ERROR_NOTE, SPLIT_NAMES, ProbeReport, layer_roles

DATA_ID = "probecore-data"  # the JSON block's id: the script and the tests read the page's numbers there
STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; display: grid;
       grid-template-columns: minmax(0, 1fr) 24em; gap: 2em; padding: 1.5em 2em; }
main { min-width: 0; }
aside { position: sticky; top: 1em; align-self: start; max-height: calc(100vh - 2em); overflow-y: auto;
        border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; background: #fafafa; font-size: 0.9em; }
aside dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 0.8em; margin: 0; }
aside dt { color: #666; }
aside dd { margin: 0; overflow-wrap: anywhere; }
aside dd[data-field="findings"] { grid-column: 1 / -1; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { cursor: pointer; user-select: none; background: #f2f2f2; position: sticky; top: 0; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
td.name, th.name { text-align: left; }
tr.best td { font-weight: bold; }
tr[data-layer]:hover, tr.pinned { background: #e8f0fe; }
td[data-layer] { cursor: pointer; }
td[data-layer]:hover, td.pinned { outline: 2px solid #222; }
g[data-layer] { cursor: pointer; }
g[data-layer]:hover rect, g.pinned rect { stroke: #000; stroke-width: 3; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; margin: 0.3em 0; }
.muted { color: #666; font-size: 0.9em; }
.scroll { overflow-x: auto; }
svg.chain { max-width: 100%; height: auto; }
table.grid td { padding: 0.05em 0.5em; }
.beside { display: flex; gap: 1.5em; align-items: flex-start; }
.beside > .scroll { flex: none; max-width: 100%; max-height: 75vh; overflow: auto; }
.beside > img { min-width: 0; flex: 1 1 20em; }
table.grid th.checkpoint { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
"""
NORMAL = {"per_row": 6, "box": (150, 58), "gap": (34, 30), "name": 22}  # boxes of the chain, up to 30 layers
COMPACT = {"per_row": 10, "box": (92, 40), "gap": (16, 18), "name": 13}  # more layers: smaller boxes
NAME_CLASS = ' class="name"'  # a column of names: left-aligned
ROLE_STROKE = {"main": "", "branch": ' stroke-dasharray="6 3"', "side": ' stroke-dasharray="2 2" fill-opacity="0.55"'}


def report_html(report: ProbeReport, figures: dict[str, bytes] | None = None, title: str = "probecore report") -> str:
    """The whole report as one HTML page; ``figures`` (caption -> PNG bytes) are embedded as data URLs."""
    parts = [f"<h1>{escape(title)}</h1>", _summary(report), "<h2>Probed layers, in model order</h2>", chain_svg(report, 0)]
    parts += ["<h2>Diagnostics</h2>", _diagnostics(report)]
    for caption, png in (figures or {}).items():
        parts.append(f"<h2>{escape(caption)}</h2>{image_tag(png, caption)}")
    parts += ["<h2>Table</h2>", _table(report, 0)]
    return page(title, "\n".join(parts), {"reports": [report_data(report)]})


def sweep_html(sweep, heatmap_png: bytes, last_png: bytes, title: str = "probecore sweep") -> str:
    """A sweep as one page: the layer x checkpoint grid (each cell that checkpoint's probe of that layer),
    the heatmap, and the last checkpoint's report."""
    last, last_index = sweep.reports[-1], len(sweep.reports) - 1
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="muted">{len(sweep.checkpoints)} checkpoints, {len(sweep.layers)} layers; test error in %. '
        "Hover over or click a cell for that layer at that checkpoint; a header sorts by its column.</p>",
        "<h2>Test error by layer and checkpoint</h2>",
        f'<div class="beside">{_grid(sweep)}{image_tag(heatmap_png, "layer x checkpoint heatmap")}</div>',
        f"<h2>Last checkpoint: {escape(sweep.checkpoints[-1])}</h2>",
        chain_svg(last, last_index),
        _diagnostics(last),
        image_tag(last_png, "probe error by layer, last checkpoint"),
        _table(last, last_index),
    ]
    reports = [report_data(report, checkpoint) for checkpoint, report in zip(sweep.checkpoints, sweep.reports)]
    data = {"checkpoints": sweep.checkpoints, "reports": reports}
    return page(title, "\n".join(body), data)


def report_data(report: ProbeReport, checkpoint: str | None = None) -> dict:
    """What the page shows of each layer, as the JSON block holds it: the numbers of report.json, unrounded."""
    findings = report.diagnostics
    roles = layer_roles(report.layers)
    layers = []
    for layer, role in zip(report.layers, roles):
        metrics = layer.metrics
        layers.append({
            "name": layer.name, "op": layer.op_type, "role": role, "shape": "x".join(map(str, layer.shape)),
            "features": layer.reduction["features_in"], "features_used": layer.n_features,
            "reduction": layer.reduction["description"], "l2": layer.l2,
            "error": {split: [metrics[split].error, *metrics[split].error_interval] for split in SPLIT_NAMES},
            "loss": {split: metrics[split].loss for split in SPLIT_NAMES},
            "top5_test": metrics["test"].top5_error,
            "control_test": None if layer.control is None else layer.control["test"].error,
            "selectivity": layer.selectivity,
            "parents": layer.parents,
            "findings": [index for index, finding in enumerate(findings) if layer.name in finding.layers],
        })  # fmt: skip
    return {"checkpoint": checkpoint, "layers": layers, "findings": [finding.to_dict() for finding in findings]}


def page(title: str, body: str, data: dict) -> str:
    """The page: ``body`` beside the details panel, then the data block and the script that reads it."""
    # "<", ">" and "&" escaped as JSON allows: nothing in a name can close the script element
    block = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    script = files("probecore").joinpath("report.js").read_text()
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{STYLE}</style></head>\n<body>\n<main>\n{body}\n</main>\n'
            '<aside id="details" aria-live="polite"><p class="muted">Hover over or click a layer (a box of the chain, '
            "a row of the table, a cell of the grid) to see its details here; a click keeps them.</p></aside>\n"
            f'<script type="application/json" id="{DATA_ID}">{block}</script>\n<script>{script}</script>\n'
            "</body></html>\n")  # fmt: skip


def image_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def chain_svg(report: ProbeReport, report_index: int) -> str:
    """One box per probed layer, in model order, left to right in rows, filled from green (lowest test error
    in this report) to red (highest); each names the layer and its test error; branch layers have dashed
    borders and side branches dotted, paler ones. Each box is a ``g[data-layer]`` that shows its details."""
    errors = [layer.metrics["test"].error for layer in report.layers]
    low, high = min(errors), max(errors)
    look = NORMAL if len(errors) <= 30 else COMPACT
    (box_w, box_h), (gap_x, gap_y), per_row = look["box"], look["gap"], look["per_row"]
    rows = -(-len(errors) // per_row)
    width = per_row * box_w + (per_row - 1) * gap_x + 20
    height = rows * box_h + (rows - 1) * gap_y + 20
    shapes = []
    for index, (layer, role) in enumerate(zip(report.layers, layer_roles(report.layers))):
        row, column = divmod(index, per_row)
        x, y = 10 + column * (box_w + gap_x), 10 + row * (box_h + gap_y)
        share = 0.0 if high == low else (errors[index] - low) / (high - low)
        middle, name = x + box_w / 2, escape(shorten_middle(layer.name, look["name"]))
        lines = [(name, 'font-weight="bold"')]
        if look is NORMAL:
            lines.append((escape(shorten_middle(layer.op_type, look["name"])), 'font-size="11"'))
        lines.append((f"{100 * errors[index]:.1f}%", ""))
        step = box_h / (len(lines) + 0.4)
        texts = "".join(f'<text x="{middle}" y="{y + step * (i + 1) + 3}" text-anchor="middle" {attrs}>{text}</text>'
                        for i, (text, attrs) in enumerate(lines))  # fmt: skip
        shapes.append(
            f'<g data-report="{report_index}" data-layer="{escape(layer.name)}" tabindex="0">'
            f"<title>{escape(layer.name)}</title>"
            f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="8" fill="{_color(share)}" stroke="#555"'
            f"{ROLE_STROKE[role]}/>"
            f"{texts}</g>"
        )  # fmt: skip
        if index + 1 < len(report.layers):
            if column + 1 < per_row:
                ax, ay = x + box_w, y + box_h / 2
                shapes.append(f'<line x1="{ax}" y1="{ay}" x2="{ax + gap_x - 4}" y2="{ay}" stroke="#555" marker-end="url(#arrow)"/>')
            else:  # down to the next row's first box
                shapes.append(
                    f'<path d="M{middle},{y + box_h} V{y + box_h + gap_y / 2} H{10 + box_w / 2} '
                    f'V{y + box_h + gap_y - 4}" fill="none" stroke="#555" marker-end="url(#arrow)"/>'
                )  # fmt: skip
    marker = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
              'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>')  # fmt: skip
    legend = (f'<p class="muted">Fill: test error, green = {100 * low:.1f}% (lowest here) to red = {100 * high:.1f}% '
              "(highest). Border: solid, the main path; dashed, a branch (inside a block, around a skip); dotted, a "
              "side branch (a gate, attention scores). Hover over or click a box for its details.</p>")  # fmt: skip
    return (f'<svg class="chain" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-size="12" font-family="system-ui, sans-serif">{marker}{"".join(shapes)}'
            f"</svg>{legend}")  # fmt: skip


def _diagnostics(report: ProbeReport) -> str:
    findings = report.diagnostics
    if not findings:
        return '<p class="muted">No step back in depth, dead segment or overfitting probe.</p>'
    return "".join(f'<div class="note"><b>{escape(f.kind.replace("_", " "))}</b>: {escape(f.message)}</div>' for f in findings)


def _color(share: float) -> str:
    """Green (0) through yellow to red (1)."""
    red = int(255 * min(1.0, 2 * share)) if share < 0.5 else 255
    green = 200 if share < 0.5 else int(200 * (2 - 2 * share))
    return f"rgb({max(red, 90)},{max(green, 60)},90)"


def _summary(report: ProbeReport) -> str:
    sizes = ", ".join(f"{name} {size}" for name, size in report.split_sizes.items())
    model = report.settings.get("source", {}).get("model", "")
    line = f"{len(report.layers)} layers, {len(report.classes)} classes, samples: {sizes}"
    if report.model_test is not None:
        error = 100 * report.model_test.error
        line += f"; model's own error on the test split ({escape(str(report.model_output))}): {error:.1f}% ({MODEL_ERROR_NOTE})"
    return f'<p>{escape(str(model))}</p><p class="muted">{line}</p>'


def _cell(text: str, value: float | str | None = None, css: str = "") -> str:
    """A table cell; ``value`` (a number, or "" for none) is what its column sorts by, else its text."""
    sort = "" if value is None else f' data-value="{"" if value == "" else repr(float(value))}"'
    kind = f' class="{css}"' if css else ""
    return f"<td{kind}{sort}>{escape(text)}</td>"


def _table(report: ProbeReport, report_index: int) -> str:
    """Every layer's row, sortable by any column (``#`` puts model order back); a row shows its details."""
    head = ["#", "layer", "op", "shape", "features", "reduction", "l2", "error % train", "valid", "test", "test 95% CI"]
    has_control = any(layer.control is not None for layer in report.layers)
    if has_control:
        head.append("selectivity")
    best = min(layer.metrics["test"].error for layer in report.layers)
    rows = []
    for index, layer in enumerate(report.layers):
        low, high = layer.metrics["test"].error_interval
        op = f"{layer.op_type} ({layer.role})" if layer.role in ("branch", "side") else layer.op_type
        cells = [_cell(str(index + 1), index), _cell(layer.name, css="name"), _cell(op, css="name"),
                 _cell("x".join(map(str, layer.shape))), _cell(str(layer.n_features), layer.n_features),
                 _cell(layer.reduction["description"], css="name"),
                 _cell("" if layer.l2 is None else f"{layer.l2:.0e}", "" if layer.l2 is None else layer.l2),
                 *(_cell(f"{100 * layer.metrics[s].error:.1f}", layer.metrics[s].error) for s in SPLIT_NAMES),
                 _cell(f"{100 * low:.1f}-{100 * high:.1f}", low)]  # fmt: skip
        if has_control:
            selectivity = layer.selectivity
            cells.append(_cell("", "") if selectivity is None else _cell(f"{100 * selectivity:.1f}", selectivity))
        css = ' class="best"' if layer.metrics["test"].error == best else ""
        row = f'<tr{css} data-report="{report_index}" data-layer="{escape(layer.name)}" tabindex="0">'
        rows.append(row + "".join(cells) + "</tr>")
    header = "".join(f'<th{NAME_CLASS if name in ("layer", "op", "reduction") else ""}>{escape(name)}</th>' for name in head)
    return _sortable(header, rows)


def _grid(sweep) -> str:
    """The layer x checkpoint table of test errors, each cell colored as the chain is (over the whole grid)
    and showing that layer's details at that checkpoint."""
    grid = sweep.grid("test")
    finite = grid[grid == grid]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    head = f"<th>#</th><th{NAME_CLASS}>layer</th>"
    head += "".join(f'<th class="checkpoint">{escape(name)}</th>' for name in sweep.checkpoints)
    rows = []
    for index, (name, values) in enumerate(zip(sweep.layers, grid)):
        cells = [_cell(str(index + 1), index), _cell(name, css="name")]
        for column, value in enumerate(values):
            if value != value:  # this checkpoint did not probe the layer
                cells.append(_cell("", ""))
                continue
            share = 0.0 if high == low else (value - low) / (high - low)
            cells.append(f'<td data-report="{column}" data-layer="{escape(name)}" data-value="{float(value)!r}" '
                         f'style="background:{_color(share)}">{100 * value:.1f}</td>')  # fmt: skip
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return _sortable(head, rows, "grid")


def _sortable(header: str, rows: list[str], css: str = "") -> str:
    """A table whose headers sort it (report.js), in a box that scrolls when it is too wide."""
    classes = " ".join(["sortable", css]).strip()
    return (f'<div class="scroll"><table class="{classes}"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")  # fmt: skip
