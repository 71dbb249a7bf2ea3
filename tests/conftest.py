"""Shared fixtures."""

import zlib

import numpy as np
import pytest


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
