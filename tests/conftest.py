"""Shared fixtures."""

import tempfile
import zlib

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
