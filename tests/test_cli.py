"""The ``probe`` command: happy paths on the bundled model, and one clear line for each user mistake."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROBE_SCRIPT
from typer.testing import CliRunner

from probecore.bundled import DEMO_MODEL
from probecore.cli.app import app

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(arg) for arg in args], env=env)


def small_npz(path, arrays, **changes):
    """A 600-sample cut of the bundled digits, with some keys changed or (value None) removed."""
    keep = {"x_train": 400, "y_train": 400, "x_valid": 100, "y_valid": 100, "x_test": 100, "y_test": 100}
    data = {key: arrays[key][:count] for key, count in keep.items()}
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    np.savez(path, **data)
    return path


def test_layers_lists_the_default_layers_as_json():
    result = invoke("layers", DEMO_MODEL, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == ["pixels", "relu1", "pool1", "relu2", "pool2", "relu3", "logits"]
    assert rows[1] == {
        "name": "relu1", "op_type": "Relu", "shape": [32, 28, 28], "features": 25088, "default": True, "output": False,
        "role": "main",
    }  # fmt: skip


def test_run_writes_report_and_csv_and_prints_json(tmp_path, demo_arrays):
    data = small_npz(tmp_path / "data.npz", demo_arrays)
    out = tmp_path / "results"
    result = invoke("run", DEMO_MODEL, "--data", data, "--out", out, "--layers", "op:Relu", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads((out / "report.json").read_text())
    assert printed == written
    assert [layer["name"] for layer in written["layers"]] == ["relu1", "relu2", "relu3"]
    assert written["split_sizes"] == {"train": 400, "valid": 100, "test": 100}
    assert written["model"]["output"] == "logits"
    assert (out / "probes.csv").read_text().count("\n") == 4


def test_run_prints_the_table(tmp_path, demo_arrays):
    data = small_npz(tmp_path / "data.npz", demo_arrays)
    result = invoke("run", DEMO_MODEL, "--data", data, "--out", tmp_path / "r", "--layers", "relu3,logits")
    assert result.exit_code == 0, result.output
    assert "relu3" in result.stdout and "error % tr/va/te" in result.stdout and "features used" in result.stdout
    assert "model's own error on the test split (logits)" in result.stdout
    assert "held out only if the data excludes the model's own training samples" in result.stdout


def test_run_with_a_chosen_strength_and_the_control_task(tmp_path, demo_arrays):
    data = small_npz(tmp_path / "data.npz", demo_arrays)
    out = tmp_path / "results"
    result = invoke("run", DEMO_MODEL, "--data", data, "--out", out, "--layers", "relu3,logits", "--l2", "1e-2",
                    "--control", "--threads", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "selectivity" in result.stdout and "control err" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["spec"]["fit"]["l2"] == 1e-2 and report["settings"]["spec"]["control_task"] is True
    for layer in report["layers"]:
        assert layer["fit"]["l2"] == 1e-2 and [point["l2"] for point in layer["fit"]["l2_path"]] == [1e-2]
        control, test = layer["control"], layer["metrics"]["test"]
        assert control["selectivity"] == pytest.approx(control["metrics"]["test"]["error"] - test["error"])
        assert control["selectivity"] > 0.5  # digits never repeat: the control probe is at chance on test
    rows = (out / "probes.csv").read_text().splitlines()
    assert rows[0].endswith("l2,control_test_error,selectivity") and len(rows) == 3


def test_run_tries_every_strength_given(tmp_path, demo_arrays):
    data = small_npz(tmp_path / "data.npz", demo_arrays)
    result = invoke("run", DEMO_MODEL, "--data", data, "--out", tmp_path / "r", "--layers", "relu3", "--l2", "1e-3,1e-1",
                    "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    (layer,) = json.loads(result.stdout)["layers"]
    assert [point["l2"] for point in layer["fit"]["l2_path"]][0] == 1e-1 and layer["fit"]["l2"] in (1e-1, 1e-3)


def test_debug_variable_shows_the_traceback(tmp_path):
    result = invoke("layers", tmp_path / "missing.onnx", env={"PROBECORE_DEBUG": "1"})
    assert result.exit_code != 0 and type(result.exception).__name__ == "ModelError"


@pytest.mark.skipif(not PROBE_SCRIPT.exists(), reason="the probe console script is not installed in this environment")
def test_console_script_runs_the_demo_and_reports_errors_on_stderr(tmp_path, demo_results):
    report = json.loads((demo_results / "report.json").read_text())  # written by the console script
    errors = {layer["name"]: layer["metrics"]["test"]["error"] for layer in report["layers"]}
    assert errors["pixels"] > errors["relu3"]
    failed = subprocess.run([PROBE_SCRIPT, "layers", tmp_path / "missing.onnx"], capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [f"error: model file not found: {tmp_path / 'missing.onnx'}; "
                                                  "pass the path of an .onnx file"]


def test_module_entry_point_matches_console_script():
    result = subprocess.run([sys.executable, "-m", "probecore.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "probe" in result.stdout


def test_a_second_run_reads_the_features_from_the_cache(tmp_path, demo_arrays):
    data = small_npz(tmp_path / "data.npz", demo_arrays)
    args = ["run", DEMO_MODEL, "--data", data, "--layers", "relu2,relu3", "--cache-dir", tmp_path / "cache", "--json"]
    first = json.loads(invoke(*args, "--out", tmp_path / "a").stdout)
    second = json.loads(invoke(*args, "--out", tmp_path / "b").stdout)
    assert first["settings"]["cache"]["splits_from_cache"] == 0
    assert second["settings"]["cache"]["splits_from_cache"] == 3
    assert second["settings"]["source"]["bytes_fetched"] == 0
    assert [layer["metrics"] for layer in first["layers"]] == [layer["metrics"] for layer in second["layers"]]
    no_cache = json.loads(invoke(*args[:-3], "--no-cache", "--json", "--out", tmp_path / "c").stdout)
    assert no_cache["settings"]["cache"] is None


def test_ctrl_c_says_where_extracted_features_are_kept_only_when_a_cache_keeps_them(tmp_path, demo_arrays, monkeypatch):
    from probecore.backends.onnx_source import OnnxSource

    real_run = OnnxSource._run

    def interrupted_after_two_batches(self, *args, **kwargs):
        for index, batch in enumerate(real_run(self, *args, **kwargs)):
            if index == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(OnnxSource, "_run", interrupted_after_two_batches)
    data, cache = small_npz(tmp_path / "data.npz", demo_arrays), tmp_path / "cache"
    common = ("run", DEMO_MODEL, "--data", data, "--out", tmp_path / "r", "--batch-size", "50")
    result = invoke(*common, "--cache-dir", cache)
    assert result.exit_code == 130 and not (tmp_path / "r").exists()
    assert result.stderr == (
        f"interrupted; no results were written; the features extracted so far are kept in the cache ({cache}); "
        "the same command resumes there\n"
    )
    (manifest,) = cache.glob("*/manifest.json")
    assert json.loads(manifest.read_text())["completed"] == 100
    uncached = invoke(*common, "--no-cache")
    assert uncached.exit_code == 130 and uncached.stderr == "interrupted; no results were written\n"
