"""Core operations x backends x dtypes x shapes, one body each (tests/core_bodies.py).

The CUDA simulator runs the same bodies with device arrays and its own shapes
(tests/cuda_sim/test_core_ops_sim.py). ``backend="reference"`` is the oracle itself, so it
is not a case here; a backend that cannot run on this machine is skipped with its reason.
"""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn as na

import core_bodies as cb

BACKENDS = ("cpu", "cuda")


def _usable(backend):
    why = na.available_backends().get(backend, "not registered")
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")


@pytest.mark.parametrize("shape", cb.HOST_SHAPES, ids=[s[0] for s in cb.HOST_SHAPES])
@pytest.mark.parametrize("dtype", cb.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(cb.OPERATIONS))
def test_core_operation_matches_the_reference(rng, op, backend, dtype, shape):
    _usable(backend)
    name, dims, opts = shape
    if op == "merge" and opts:
        pytest.skip("merge_states takes no attention options (one case per shape suffices)")
    cb.OPERATIONS[op](rng, backend, dtype, dims, opts)
