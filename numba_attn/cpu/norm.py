"""RMSNorm on the CPU, float32 (or float64) accumulation.

Two entry points with one body: ``rms_norm_rows`` (``prange`` over rows) for large inputs
and ``rms_norm_rows_serial`` for the few rows of a decode step (QK-norm of one token),
where waking the thread pool would cost more than the work.
"""
from __future__ import annotations

import math

from numba import prange

from .._jit import inline, jit, parallel_guard

PARALLEL_MIN_ELEMENTS = 1 << 16  # below this many elements the serial kernel is used


@inline
def _row(x, weight, eps, out, r):
    d = x.shape[1]
    acc = 0.0
    for c in range(d):
        acc += x[r, c] * x[r, c]
    inv = 1.0 / math.sqrt(acc / d + eps)
    for c in range(d):
        out[r, c] = x[r, c] * inv * weight[c]


@jit(parallel=True)
def rms_norm_rows(x, weight, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r] ** 2) + eps) * weight, for x, out (n, d), weight (d,).

    x, weight and out share one compute dtype (float32 or float64); callers upcast float16.
    """
    for r in prange(x.shape[0]):
        _row(x, weight, eps, out, r)


@jit
def rms_norm_rows_serial(x, weight, eps, out):
    """As :func:`rms_norm_rows`, on the calling thread."""
    for r in range(x.shape[0]):
        _row(x, weight, eps, out, r)


def launch(x, weight, eps, out):
    """Pick the parallel or the serial kernel by size."""
    if x.size >= PARALLEL_MIN_ELEMENTS:
        with parallel_guard():
            rms_norm_rows(x, weight, eps, out)
    else:
        rms_norm_rows_serial(x, weight, eps, out)
