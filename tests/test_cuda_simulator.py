"""Runs the CUDA test suite (tests/cuda_sim) under the CUDA simulator, in its own process.

The simulator must be enabled before numba is imported, so it cannot share this pytest
process. This wrapper makes ``python -m pytest`` cover the CUDA kernels on machines with
no GPU; its output (the inner pytest summary) is shown on failure.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_cuda_kernels_under_simulator():
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed (pip install '.[cuda]')")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(HERE, "cuda_sim"), "-q",
         "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        env=env, capture_output=True, text=True, timeout=1500, cwd=os.path.dirname(HERE))
    tail = (res.stdout + res.stderr)[-6000:]
    print(tail)
    assert res.returncode == 0, tail
    assert " passed" in res.stdout, tail
