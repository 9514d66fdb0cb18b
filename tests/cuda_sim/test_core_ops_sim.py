"""The core-operation bodies of tests/core_bodies.py on the CUDA backend, with device
arrays in and out, on the simulator's small shapes (the host run covers larger ones)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from numba import cuda

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: core_bodies

import core_bodies as cb  # noqa: E402

SIM_SHAPES = [
    ("gqa-causal", (1, 5, 7, 4, 2, 8, 8), dict(causal=True)),
    ("decode-softcap-sinks", (2, 1, 9, 2, 1, 8, 8), dict(softcap=2.0, sinks=True)),
    ("sq>sk-window-dv", (1, 6, 4, 2, 2, 8, 4), dict(causal=True, window=(2, 0),
                                                   alibi_slopes=True)),
]


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


@pytest.mark.parametrize("shape", SIM_SHAPES, ids=[s[0] for s in SIM_SHAPES])
@pytest.mark.parametrize("dtype", cb.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", sorted(cb.OPERATIONS))
def test_core_operation_on_device_arrays_matches_the_reference(rng, tuned, op, dtype, shape):
    name, dims, opts = shape
    if op == "merge" and opts.get("causal") is not True:
        pytest.skip("merge_states takes no attention options (one case per dtype)")
    with tuned():
        cb.OPERATIONS[op](rng, "auto", dtype, dims, opts, to_dev=cuda.to_device,
                          to_host=_host)
