"""The terminal's per-layer table: long layer names shortened in the middle, and the table within the
terminal's width (80 columns), with the full names in report.json."""

import json
import os
import subprocess
import sys

import numpy as np
from onnx_models import save_long_named_chain
from rich.console import Console
from test_cli import invoke
from test_report import make_report

from probecore.cli import output
from probecore.cli.output import report_table
from probecore.softmax import SplitMetrics


def printed_lines(table, width):
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(table)
    return console.export_text().splitlines()


def layer_rows(lines):
    return [line for line in lines if line.startswith("│")]


def assert_shortened_in_the_middle(name, shown):
    head, tail = shown.split("...")
    assert len(shown) < len(name) and name.startswith(head) and name.endswith(tail) and head and tail


def test_probe_run_on_long_names_fits_80_columns_and_report_json_keeps_the_names(tmp_path, rng, monkeypatch):
    model = save_long_named_chain(tmp_path / "model.onnx", rng, n_blocks=3)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=(x[:, 0] > 0).astype(int) + (x[:, 1] > 0))
    narrow = Console(width=80, record=True)
    monkeypatch.setattr(output, "console", narrow)
    result = invoke("run", model, "--data", tmp_path / "data.npz", "--out", tmp_path / "out", "--no-cache")
    assert result.exit_code == 0, result.output
    lines = narrow.export_text().splitlines()
    names = [layer["name"] for layer in json.loads((tmp_path / "out" / "report.json").read_text())["layers"]]
    assert "/encoder/layer.2/intermediate/intermediate_act_fn/Relu_output_0" in names
    table = lines[: lines.index(next(line for line in lines if line.startswith("└"))) + 1]
    assert max(len(line) for line in table) <= 80
    rows = layer_rows(table)
    assert len(rows) == len(names)  # one line per layer: nothing wrapped
    for name, row in zip(names, rows):
        shown = row.split("│")[1].strip()
        if shown != name:
            assert_shortened_in_the_middle(name, shown)


def test_narrow_tables_drop_columns_and_wide_ones_keep_them_all():
    report = make_report(4)
    report.layers[1].name = "encoder.layer.3.attention.self.query.output"
    for layer in report.layers:
        layer.l2 = 1e-3
        layer.control = {split: SplitMetrics(10, 2.0, 0.6, None) for split in ("train", "valid", "test")}
        layer.metrics["test"] = SplitMetrics(10, 1.0, 0.2, 0.1)
    wide = printed_lines(report_table(report, 240), 240)
    every = ["layer", "op", "shape", "features used", "reduction", "l2", "loss tr/va/te", "error % tr/va/te",
             "test err 95% CI", "top-5 % te", "control err % tr/te", "selectivity"]  # fmt: skip
    assert [cell.strip() for cell in wide[2].split("┃")[1:-1]] == every
    assert "encoder.layer.3.attention.self.query.output" in wide[5]
    lines = printed_lines(report_table(report, 80), 80)
    assert max(len(line) for line in lines) <= 80 and len(layer_rows(lines)) == 4
    header = [cell.strip() for cell in lines[2].split("┃")[1:-1]]
    assert header[0] == "layer" and {"l2", "error % tr/va/te", "test err 95% CI", "selectivity"} <= set(header)
    assert "loss tr/va/te" not in header and "reduction" not in header
    assert_shortened_in_the_middle(report.layers[1].name, lines[5].split("│")[1].strip())


def test_piped_output_takes_the_width_columns_gives(tmp_path, rng):
    # piped output gets 160 columns (logs), unless COLUMNS says how wide the reader is
    model = save_long_named_chain(tmp_path / "model.onnx", rng, n_blocks=2)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=(x[:, 0] > 0).astype(int))
    command = [sys.executable, "-m", "probecore.cli", "run", model, "--data", tmp_path / "data.npz", "--no-cache"]
    widths = {}
    for columns in ("80", None):
        env = {key: value for key, value in os.environ.items() if key != "COLUMNS"} | ({"COLUMNS": columns} if columns else {})
        out = tmp_path / f"out{columns}"
        result = subprocess.run([*map(str, command), "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        widths[columns] = max(len(line) for line in result.stdout.splitlines() if line.startswith(("┃", "│")))
    assert widths["80"] <= 80 < widths[None]
