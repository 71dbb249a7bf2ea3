"""Shared fixtures."""

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so a failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
