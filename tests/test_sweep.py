"""Probes across checkpoints (ProbeTracker, run_sweep, ``probe sweep``), the figures, the HTML report, and
``probe report`` drawing them again from the JSON."""

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_cli import invoke, small_npz
from test_diagnostics import planted_report

import probecore
from probecore.bundled import DEMO_MODEL
from probecore.html_report import report_html
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
    assert "data:image/png;base64," in html and "<script" not in html and "http" not in html.split("<svg")[0]
    assert all(f"<td>{layer.name}</td>" in html for layer in report.layers)


def test_html_escapes_layer_names():
    report = planted_report()
    report.layers[0].name = "<b>layer</b>"
    assert "<b>layer</b>" not in report_html(report) and "&lt;b&gt;layer&lt;/b&gt;" in report_html(report)


@pytest.fixture
def checkpoints(tmp_path, rng):
    """The demo model as trained, and the same graph with its weights scrambled (as before training)."""
    trained = onnx.load(str(DEMO_MODEL))
    scrambled = onnx.load(str(DEMO_MODEL))
    for initializer in scrambled.graph.initializer:
        values = numpy_helper.to_array(initializer)
        if values.size > 16:
            noise = rng.normal(scale=values.std() + 1e-3, size=values.shape).astype(values.dtype)
            initializer.CopyFrom(numpy_helper.from_array(noise, initializer.name))
    onnx.save(scrambled, str(tmp_path / "ckpt_0.onnx"))
    onnx.save(trained, str(tmp_path / "ckpt_1.onnx"))
    return [tmp_path / "ckpt_0.onnx", tmp_path / "ckpt_1.onnx"]


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
    assert "Test error grid" in (out / "report.html").read_text()
    (out / "heatmap.png").unlink()
    again = invoke("report", out)
    assert again.exit_code == 0, again.output
    assert (out / "heatmap.png").read_bytes().startswith(PNG)


def test_probe_report_without_results_names_what_it_needs(tmp_path):
    result = invoke("report", tmp_path)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: {tmp_path} holds no report.json or sweep.json; pass a directory written by "
                                     "`probe run` or `probe sweep`")  # fmt: skip
    (tmp_path / "report.json").write_text("{}")
    result = invoke("report", tmp_path)
    assert result.exit_code == 1 and "is not a probecore report (KeyError" in result.stderr
