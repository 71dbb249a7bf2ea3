"""Probes across checkpoints (ProbeTracker, run_sweep, ``probe sweep``), the figures, the HTML report, and
``probe report`` drawing them again from the JSON."""

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_cli import invoke, small_npz
from test_diagnostics import planted_report

import probecore
from probecore.bundled import DEMO_MODEL
from probecore.cli.sweep import checkpoint_order
from probecore.html_report import DATA_ID, report_html
from probecore.render import report_figures

PNG = b"\x89PNG\r\n\x1a\n"


def checkpoint_sources(rng, n=600):
    """Three 'checkpoints' of one two-layer model: layer ``late`` learns the labels as training goes on."""
    labels = rng.integers(0, 3, size=n)
    sources = []
    for step, signal in ((0, 0.0), (1, 1.0), (2, 3.0)):
        late = rng.normal(size=(n, 8))
        late[:, 0] += signal * labels
        early = rng.normal(size=(n, 8))
        early[:, 1] += labels
        sources.append((f"step{step}", probecore.ArraySource({"early": early, "late": late})))
    return sources, probecore.split_dataset(np.arange(n), labels, seed=0)


def test_the_grid_holds_each_checkpoint_probe_errors_in_order(rng):
    sources, dataset = checkpoint_sources(rng)
    tracker = probecore.ProbeTracker(dataset)
    for label, source in sources:
        tracker.record(label, source)
    sweep = tracker.sweep
    assert sweep.checkpoints == ["step0", "step1", "step2"] and sweep.layers == ["early", "late"]
    grid = sweep.grid()
    for column, checkpoint in enumerate(sweep.reports):
        assert [layer.metrics["test"].error for layer in checkpoint.layers] == list(grid[:, column])
    assert grid[1, 0] > 0.5 and grid[1, 2] < 0.1  # `late` reads the labels only once trained
    written = json.loads(json.dumps(sweep.to_dict()))
    assert json.loads(json.dumps(probecore.SweepReport.from_dict(written).to_dict())) == written
    assert sweep.to_csv().splitlines()[0] == "layer,step0,step1,step2"
    assert probecore.run_sweep(sources, dataset).to_dict()["test_error"] == sweep.to_dict()["test_error"]


def test_figures_are_pngs_and_the_html_draws_each_layer_colored():
    report = planted_report()
    files = report_figures(report)
    assert files["errors.png"].startswith(PNG)
    html = files["report.html"]
    assert html.count("<rect ") == len(report.layers) and "dead segment" in html
    fills = re.findall(r'<rect [^>]*fill="(rgb\([^"]+\))"', html)
    assert fills[-1] != fills[0]  # the best layer (5%) is not colored as the 30% ones
    assert "data:image/png;base64," in html and re.findall(r'(?:src|href)="(?!data:)', html) == []  # nothing fetched
    assert all(f'<td class="name">{layer.name}</td>' in html for layer in report.layers)
    assert html.count("<g data-report") == len(report.layers)


def test_html_escapes_layer_names():
    report = planted_report()
    report.layers[0].name = "<b>layer</b></script><script>alert(1)</script>"
    html = report_html(report)
    assert "<b>layer</b>" not in html and "&lt;b&gt;layer&lt;/b&gt;" in html and "alert(1)</script>" not in html
    block = re.search(f'<script type="application/json" id="{DATA_ID}">(.*?)</script>', html).group(1)
    assert json.loads(block)["reports"][0]["layers"][0]["name"] == report.layers[0].name


@pytest.fixture
def checkpoints(tmp_path, rng):
    return save_checkpoints(tmp_path, rng)


def save_checkpoints(folder, rng):
    """The demo model as trained, and the same graph with its weights scrambled (as before training)."""
    trained = onnx.load(str(DEMO_MODEL))
    scrambled = onnx.load(str(DEMO_MODEL))
    for initializer in scrambled.graph.initializer:
        values = numpy_helper.to_array(initializer)
        if values.size > 16:
            noise = rng.normal(scale=values.std() + 1e-3, size=values.shape).astype(values.dtype)
            initializer.CopyFrom(numpy_helper.from_array(noise, initializer.name))
    onnx.save(scrambled, str(folder / "ckpt_0.onnx"))
    onnx.save(trained, str(folder / "ckpt_1.onnx"))
    return [folder / "ckpt_0.onnx", folder / "ckpt_1.onnx"]


def test_probe_sweep_writes_the_grid_and_its_figures(tmp_path, checkpoints, demo_arrays):
    data = small_npz(tmp_path / "d.npz", demo_arrays)
    out = tmp_path / "sweep"
    result = invoke("sweep", *checkpoints, "--data", data, "--out", out, "--layers", "relu1,relu3,logits", "--no-cache")
    assert result.exit_code == 0, result.output
    written = json.loads((out / "sweep.json").read_text())
    assert written["checkpoints"] == ["ckpt_0", "ckpt_1"] and written["layers"] == ["relu1", "relu3", "logits"]
    trained = [row[1] for row in written["test_error"]]
    scrambled = [row[0] for row in written["test_error"]]
    assert trained[-1] < scrambled[-1]  # the trained logits read the digits far better than scrambled ones
    assert (out / "heatmap.png").read_bytes().startswith(PNG) and (out / "errors_last.png").read_bytes().startswith(PNG)
    assert (out / "report.html").read_text().count('<td data-report="1"') == 3  # the trained checkpoint's column
    (out / "heatmap.png").unlink()
    again = invoke("report", out)
    assert again.exit_code == 0, again.output
    assert (out / "heatmap.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize(
    "given, expected",
    [
        (["ckpt_10.onnx", "ckpt_2.onnx", "ckpt_1.onnx"], ["ckpt_1.onnx", "ckpt_2.onnx", "ckpt_10.onnx"]),
        (["run/epoch2_step100.onnx", "run/epoch1_step1000.onnx", "run/epoch1_step500.onnx"],
         ["run/epoch1_step500.onnx", "run/epoch1_step1000.onnx", "run/epoch2_step100.onnx"]),
        (["ckpt_010.onnx", "ckpt_9.onnx", "nets:step3"], ["ckpt_9.onnx", "ckpt_010.onnx", "nets:step3"]),
    ],
)  # fmt: skip
def test_natural_order_compares_the_numbers_in_checkpoint_names_as_numbers(given, expected):
    assert checkpoint_order(given) == (expected, "natural", "by the numbers in the names")


def test_names_without_a_number_keep_the_given_order_and_say_which():
    given = ["final.onnx", "ckpt_3.onnx", "init.onnx"]
    reason = "final, init hold no number to sort by; put the step in every name"
    assert checkpoint_order(given) == (given, "given", reason)
    listed = ["ckpt_10.onnx", "ckpt_2.onnx"]
    assert checkpoint_order(listed, "given") == (listed, "given", "as listed")


@pytest.mark.parametrize(
    "options, used, line, order",
    [([], "natural", "checkpoint order natural (by the numbers in the names): ckpt_2, ckpt_10", ["ckpt_2", "ckpt_10"]),
     (["--order", "given"], "given", "checkpoint order given (as listed): ckpt_10, ckpt_2", ["ckpt_10", "ckpt_2"])],
)  # fmt: skip
def test_probe_sweep_puts_ckpt_2_before_ckpt_10_unless_told_to_keep_the_order(
    tmp_path, checkpoints, demo_arrays, options, used, line, order
):
    shutil.copy(checkpoints[0], tmp_path / "ckpt_2.onnx")  # scrambled
    shutil.copy(checkpoints[1], tmp_path / "ckpt_10.onnx")  # trained
    data, out = small_npz(tmp_path / "d.npz", demo_arrays), tmp_path / "sweep"
    models = [tmp_path / "ckpt_10.onnx", tmp_path / "ckpt_2.onnx"]  # as the shell's ckpt_*.onnx lists them
    result = invoke("sweep", *models, "--data", data, "--out", out, "--layers", "logits", "--no-cache", *options)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == line
    written = json.loads((out / "sweep.json").read_text())
    assert written["checkpoints"] == order
    sources = [report["settings"]["source"] for report in written["reports"]]
    assert [source["model"] for source in sources] == [str(tmp_path / f"{name}.onnx") for name in order]
    assert [source["checkpoint_order"] for source in sources] == [used, used]
    errors = dict(zip(order, written["test_error"][0]))
    assert errors["ckpt_10"] < errors["ckpt_2"]  # each column holds its own checkpoint's probes


def test_probe_report_without_results_names_what_it_needs(tmp_path):
    result = invoke("report", tmp_path)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: {tmp_path} holds no report.json or sweep.json; pass a directory written by "
                                     "`probe run` or `probe sweep`")  # fmt: skip
    (tmp_path / "report.json").write_text("{}")
    result = invoke("report", tmp_path)
    assert result.exit_code == 1 and "is not a probecore report (KeyError" in result.stderr
