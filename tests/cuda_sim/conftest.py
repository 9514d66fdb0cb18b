"""CUDA tests: run under numba-cuda's simulator by default, on a real GPU on request.

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim -q -p no:cacheprovider   # simulator
    NUMBA_ENABLE_CUDASIM=0 python -m pytest tests/cuda_sim -q -m gpu                 # real GPU

The default pytest run ignores this directory (pyproject ``addopts``): the simulator must
be switched on before numba is imported, so it needs its own process. Every test here is
marked ``gpu``. Under the simulator the warp-shuffle shim (``sim_shim.py``) is installed
and tiny, odd tile sizes are forced so multi-block, multi-tile and tail paths all run.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # no effect if numba is already imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import config as numba_config  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

SIMULATED = bool(numba_config.ENABLE_CUDASIM)


def _skip_reason():
    from numba_attn import available_backends

    return available_backends().get("cuda")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    why = _skip_reason()
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if why:
                item.add_marker(pytest.mark.skip(reason=f"cuda backend unavailable: {why}"))


def pytest_report_header(config):
    return f"numba_attn cuda tests: {'CUDA simulator' if SIMULATED else 'real GPU'}"


@pytest.fixture(scope="session", autouse=True)
def _simulator():
    if not SIMULATED:
        yield
        return
    import sim_shim

    sim_shim.install()
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)  # simulated threads hand the GIL over quicker
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def rng(request):
    """A generator seeded from the test id, so each case has its own fixed data."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# tile sizes forced in tests: small and odd so queries, keys and warps all have tails
SMALL = dict(block_q=3, block_k=5, num_warps=1)


@pytest.fixture
def tuned():
    """``tuned(**kw)``: a context forcing the CUDA launch plan (SMALL merged with kw)."""
    from numba_attn.cuda import launch

    return lambda **kw: launch.tuning(**{**SMALL, **kw})
