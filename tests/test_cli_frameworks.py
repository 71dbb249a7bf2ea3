"""``probe run package.module:function``: torch and Keras models probed from the command line, and one clear
line for a reference that cannot be used."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TORCH_MODULE = """
import torch

def build():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return net, torch.zeros(2, 6)

def alone():
    return torch.nn.Linear(6, 3)

def not_a_model():
    return "model.onnx"
"""

KERAS_MODULE = """
import keras

def build():
    inputs = keras.Input((6,), name="features")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="scores")(hidden))
"""


def probe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "probecore.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin", "HOME": str(cwd)})  # fmt: skip


@pytest.fixture
def workdir(tmp_path, rng):
    (tmp_path / "torchnets.py").write_text(textwrap.dedent(TORCH_MODULE))
    (tmp_path / "kerasnets.py").write_text(textwrap.dedent(KERAS_MODULE))
    y = rng.integers(0, 3, size=400)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    x[:, 0] += 4 * y
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return tmp_path


def test_a_torch_reference_is_probed_with_module_names(workdir):
    result = probe("run", "torchnets:build", "--data", "data.npz", "--out", "out", "--quiet", "--no-cache", cwd=workdir)
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == ["input", "1", "output"]
    assert report["settings"]["source"]["model"] == "torchnets:build"
    assert report["layers"][0]["metrics"]["test"]["error"] < 0.1


def test_a_keras_reference_lists_its_layers(workdir):
    result = probe("layers", "kerasnets:build", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(row["name"], row["op_type"]) for row in rows] == [("features", "Input"), ("hidden", "Dense"), ("scores", "MatMul")]


@pytest.mark.parametrize(
    "reference, message",
    [
        ("nosuchmodule:build", "error: cannot import 'nosuchmodule' for model 'nosuchmodule:build' (No module named "
         "'nosuchmodule'); run from the folder that holds it, or install it"),
        ("torchnets:missing", "error: 'torchnets' has no function 'missing'; give package.module:function"),
        ("torchnets:alone", "error: torchnets:alone returned a torch module alone; return (module, example_input) so "
         "it can be traced"),
        ("torchnets:not_a_model", "error: torchnets:not_a_model returned a str, not a torch.nn.Module or a Keras "
         "model; return one of those"),
    ],
)  # fmt: skip
def test_a_reference_that_cannot_be_used_gets_one_line(workdir, reference, message):
    result = probe("run", reference, "--data", "data.npz", "--out", "out", "--no-cache", cwd=workdir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [message]
    assert not (workdir / "out").exists()
