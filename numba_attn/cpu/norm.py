"""RMSNorm on the CPU: ``prange`` over rows, float32 (or float64) accumulation."""
from __future__ import annotations

import math

from numba import prange

from .._jit import jit


@jit(parallel=True)
def rms_norm_rows(x, weight, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r] ** 2) + eps) * weight, for x, out (n, d), weight (d,).

    x, weight and out share one compute dtype (float32 or float64); callers upcast float16.
    """
    n, d = x.shape
    for r in prange(n):
        acc = 0.0
        for c in range(d):
            acc += x[r, c] * x[r, c]
        inv = 1.0 / math.sqrt(acc / d + eps)
        for c in range(d):
            out[r, c] = x[r, c] * inv * weight[c]
