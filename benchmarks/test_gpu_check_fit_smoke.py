"""``gpu_check_fit.py --smoke`` runs end to end on the CPU, so the script is ready when a GPU machine is lent:
every part writes its section, the device fitter (onnxruntime's CPU provider here) gives the CPU path's
strengths, objectives within 1e-4 and the same test errors to 0.1 points, and both ``probe run`` sides
finish. Figures at these sizes mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("gpu_check_fit.py")


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["sizes"] == "smoke"
    assert results["extraction"]["batch_16"]["concatenated_ratio_to_plain"] > 0
    for fit in (results["fit"]["classes_10"], results["fit"]["classes_100"]):
        assert fit["same_strength_every_layer"], fit
        assert fit["largest_objective_relative_difference"] <= 1e-4, fit
        assert fit["largest_test_error_difference_points"] <= 0.2, fit  # 500 test samples: one is 0.2 points
    assert results["decode"]["500x375_resize_256"]["workers_1"]["images_per_s"] > 0
    assert "wall_seconds" in results["run"]["cpu"] and "wall_seconds" in results["run"]["device"], results["run"]
