"""Same-run machine limits for the benchmarks, measured with the kernels' own SIMD layer.

* :func:`fma_peak` — register-only vector FMAs (12 independent accumulators per thread):
  the compute ceiling the prefill micro-kernels are held against.
* :func:`stream_read` — every element of K and V storage loaded once with the same vector
  loads (and in-register float16 / bfloat16 conversion) as the decode kernel, on the same
  threads: the memory ceiling of a decode step over that cache.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import jit
from .simd import lanes, vadd, vfma, vhsum, vload, vload_tail, vsplat, vstore, vzero


@jit(parallel=True)
def fma_peak(n_iter, n_lanes, out):
    """``n_lanes`` parallel lanes of ``n_iter`` x 12 vector FMAs (float32); out (n_lanes,)
    receives a checksum per lane. Returns the float32 FMAs done (2 flops each)."""
    w = lanes(out)
    for lane in prange(n_lanes):
        x = vsplat(np.float32(0.999999))
        y = vsplat(np.float32(1e-7))
        a0 = a1 = a2 = a3 = a4 = a5 = vzero(out)
        a6 = a7 = a8 = a9 = a10 = a11 = vzero(out)
        for _ in range(n_iter):
            a0 = vfma(a0, x, y)
            a1 = vfma(a1, x, y)
            a2 = vfma(a2, x, y)
            a3 = vfma(a3, x, y)
            a4 = vfma(a4, x, y)
            a5 = vfma(a5, x, y)
            a6 = vfma(a6, x, y)
            a7 = vfma(a7, x, y)
            a8 = vfma(a8, x, y)
            a9 = vfma(a9, x, y)
            a10 = vfma(a10, x, y)
            a11 = vfma(a11, x, y)
        s = vadd(vadd(vadd(a0, a1), vadd(a2, a3)), vadd(vadd(a4, a5), vadd(a6, a7)))
        s = vadd(s, vadd(vadd(a8, a9), vadd(a10, a11)))
        out[lane] = vhsum(s)
    return n_iter * 12 * w * n_lanes


@jit(parallel=True)
def stream_read(k, v, n_items, out):
    """Sum of every element of k and v (storage arrays as the kernels get them), read by
    ``n_items`` parallel work items of contiguous storage rows; out (n_items,) float32."""
    n = k.shape[0]
    rk = k.size // max(n, 1)
    rv = v.size // max(n, 1)
    w = lanes(out)
    tmp = np.zeros((n_items, w), np.float32)
    for it in prange(n_items):
        j0 = it * n // n_items
        j1 = (it + 1) * n // n_items
        a0 = vzero(out)
        a1 = vzero(out)
        for src, row in ((k, rk), (v, rv)):
            i = j0 * row
            end = j1 * row
            while i + 2 * w <= end:
                a0 = vadd(a0, vload(src, i))
                a1 = vadd(a1, vload(src, i + w))
                i += 2 * w
            while i < end:
                a0 = vadd(a0, vload_tail(src, i, min(w, end - i)))
                i += w
        vstore(tmp[it], 0, vadd(a0, a1))
        out[it] = tmp[it].sum()
