"""RMSNorm on the GPU: one thread block per row, a shared-memory sum of squares.

float16/bfloat16/float32 rows accumulate in float32, float64 rows in float64.
"""
from __future__ import annotations

import math

from numba import cuda, float32, float64

THREADS = 128  # threads per row; a power of two (the tree reduction halves it)


def _make(acc):
    @cuda.jit
    def rms_norm_rows(x, weight, eps, out):
        """out[r] = x[r] / sqrt(mean(x[r] ** 2) + eps) * weight; one block per row r."""
        r = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = x.shape[1]
        partial = cuda.shared.array(THREADS, acc)
        s = acc(0.0)
        for c in range(t, d, THREADS):
            xv = acc(x[r, c])
            s += xv * xv
        partial[t] = s
        cuda.syncthreads()
        step = THREADS // 2
        while step > 0:
            if t < step:
                partial[t] += partial[t + step]
            cuda.syncthreads()
            step //= 2
        inv = acc(1.0) / math.sqrt(partial[0] / acc(d) + eps)
        for c in range(t, d, THREADS):
            out[r, c] = acc(x[r, c]) * inv * weight[c]

    return rms_norm_rows


_KERNELS = {}


def launch(x2d, weight, eps, out2d):
    """Run over device arrays: x2d, out2d (n, d) of one dtype, weight (d,) in the
    accumulation dtype (float64 for float64 rows, else float32)."""
    wide = str(x2d.dtype) == "float64"
    if wide not in _KERNELS:
        _KERNELS[wide] = _make(float64 if wide else float32)
    n = x2d.shape[0]
    if n:
        eps = float64(eps) if wide else float32(eps)
        _KERNELS[wide][n, THREADS](x2d, weight, eps, out2d)
