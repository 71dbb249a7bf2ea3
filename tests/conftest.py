"""Shared fixtures."""

import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

try:  # hypothesis keeps examples and constants in .hypothesis/ under the working directory, from import on
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="probecore-hypothesis-"))
except ImportError:  # no dev extra: the property tests are not collected
    pass


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so a failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def private_feature_cache(tmp_path_factory, monkeypatch):
    """Runs of the CLI cache features in a temporary directory, never in the user's ~/.cache."""
    monkeypatch.setenv("PROBECORE_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))


@pytest.fixture(scope="session")
def demo_arrays():
    """The bundled digits' arrays (x_train, y_train, ...), read once."""
    from probecore.bundled import DEMO_DATA

    with np.load(DEMO_DATA) as archive:
        return {key: archive[key] for key in archive.files}


PROBE_SCRIPT = Path(sys.executable).parent / "probe"  # installed beside this interpreter


@pytest.fixture(scope="session")
def demo_results(tmp_path_factory):
    """The folder `probe demo` writes (report.json, errors.png, report.html), made once for the session by the
    console script where it is installed, else by ``python -m probecore.cli``."""
    out = tmp_path_factory.mktemp("demo") / "probe-demo"
    command = [PROBE_SCRIPT] if PROBE_SCRIPT.exists() else [sys.executable, "-m", "probecore.cli"]
    done = subprocess.run([*command, "demo", "--quiet", "--out", out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out
