"""Writing report.json and probes.csv: complete files or none."""

import csv
import json
from pathlib import Path

import pytest

from probecore.report import LayerResult, ProbeReport
from probecore.softmax import SplitMetrics


def make_report(n_layers=2):
    layers = []
    for index in range(n_layers):
        metrics = {split: SplitMetrics(10, 0.5 + index, 0.1 * index, None) for split in ("train", "valid", "test")}
        reduction = {"features_in": 64, "features_out": 16, "description": "avgpool 2x2"}
        layers.append(LayerResult(f"layer{index}", "Relu", (4, 4, 4), reduction, metrics, 12, "converged", 0.01))
    return ProbeReport(layers, [0, 1], {"train": 10, "valid": 10, "test": 10}, settings={"seed": 0})


def test_report_files_hold_every_layer(tmp_path):
    out = make_report(3).write(tmp_path / "results")
    data = json.loads((out / "report.json").read_text())
    assert [layer["name"] for layer in data["layers"]] == ["layer0", "layer1", "layer2"]
    test = data["layers"][1]["metrics"]["test"]
    assert {key: test[key] for key in ("n", "loss", "error", "top5_error")} == {
        "n": 10, "loss": 1.5, "error": 0.1, "top5_error": None,
    }  # fmt: skip
    low, high = test["error_ci95"]
    assert 0 < low < 0.1 < high < 1
    rows = list(csv.DictReader((out / "probes.csv").open()))
    assert [row["layer"] for row in rows] == ["layer0", "layer1", "layer2"]
    assert rows[2]["test_error"] == "0.2" and rows[0]["shape"] == "4x4x4" and rows[0]["test_top5_error"] == ""
    assert rows[0]["test_error_ci95_low"] == "0" and float(rows[0]["test_error_ci95_high"]) > 0.2
    assert rows[0]["l2"] == "" and rows[0]["selectivity"] == "" and data["layers"][0]["control"] is None


def test_chosen_strength_path_and_control_task_are_written(tmp_path):
    report = make_report(1)
    layer = report.layers[0]
    layer.l2 = 1e-3
    layer.l2_path = [{"l2": 1e-2, "valid_loss": 0.7, "iterations": 9, "stop_reason": "converged"},
                     {"l2": 1e-3, "valid_loss": 0.6, "iterations": 4, "stop_reason": "early_stopping"}]  # fmt: skip
    layer.control = {split: SplitMetrics(10, 2.0, 0.7, None) for split in ("train", "valid", "test")}
    out = report.write(tmp_path / "results")
    written = json.loads((out / "report.json").read_text())["layers"][0]
    assert written["fit"]["l2"] == 1e-3 and written["fit"]["l2_path"] == layer.l2_path
    assert written["control"]["selectivity"] == pytest.approx(0.7) and written["control"]["metrics"]["test"]["error"] == 0.7
    (row,) = csv.DictReader((out / "probes.csv").open())
    assert row["l2"] == "0.001" and row["control_test_error"] == "0.7" and float(row["selectivity"]) == pytest.approx(0.7)


def test_existing_directory_gets_its_files_replaced_and_keeps_others(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "report.json").write_text("old")
    make_report().write(out)
    assert json.loads((out / "report.json").read_text())["format"] == "probecore.report/1"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_a_failed_write_leaves_no_directory_behind(tmp_path, monkeypatch):
    original_write = Path.write_bytes

    def fail_on_csv(path, data, *args, **kwargs):
        if path.name == "probes.csv":
            raise OSError("disk full")
        return original_write(path, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", fail_on_csv)
    with pytest.raises(OSError, match="disk full"):
        make_report().write(tmp_path / "results")
    assert list(tmp_path.iterdir()) == []
