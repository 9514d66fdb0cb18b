"""Shared fixtures (seeded generators); comparison helpers live in numerics.py."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id: reproducible and distinct per case."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
