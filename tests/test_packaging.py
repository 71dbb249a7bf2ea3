"""The wheel carries the three packages and the bundled demo files, and nothing generic at the top level."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools (the dev extra)")
def test_wheel_holds_core_backends_cli_and_bundled_data(tmp_path):
    # built from a copy: a build writes build/ and the egg-info beside the sources, never into the checkout
    source = tmp_path / "source"
    source.mkdir()
    ignored = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache*")
    for part in ("pyproject.toml", "README.md", "probecore", "backends", "cli"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy2
        copy(ROOT / part, source / part, **({"ignore": ignored} if (ROOT / part).is_dir() else {}))
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("probecore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "probecore/__init__.py",
        "probecore/backends/onnx_source.py",
        "probecore/cli/app.py",
        "probecore/data/mnist_convnet.onnx",
        "probecore/data/mnist5k.npz",
        "probecore/report.js",  # report.html's script
    }
    assert expected <= names
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"probecore"}
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "probe = probecore.cli.app:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
