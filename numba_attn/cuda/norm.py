"""RMSNorm on the GPU: one thread block per row, a shared-memory sum of squares.

float16/bfloat16/float32 rows accumulate in float32, float64 rows in float64 (bfloat16
rows travel as their uint16 bits: widened on load, rounded to nearest even on store).
"""
from __future__ import annotations

import math

from numba import cuda, float32, float64

from . import bf16 as bfm

THREADS = 128  # threads per row; a power of two (the tree reduction halves it)


def _make(acc, LOAD, STORE):
    @cuda.jit
    def rms_norm_rows(x, weight, eps, out):
        """out[r] = x[r] / sqrt(mean(x[r] ** 2) + eps) * weight; one block per row r."""
        r = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = x.shape[1]
        partial = cuda.shared.array(THREADS, acc)
        s = acc(0.0)
        for c in range(t, d, THREADS):
            xv = LOAD(x[r, c])
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
            out[r, c] = STORE(LOAD(x[r, c]) * inv * weight[c])

    return rms_norm_rows


_KERNELS = {}


def launch(x2d, weight, eps, out2d):
    """Run over device arrays: x2d, out2d (n, d) of one dtype, weight (d,) in the
    accumulation dtype (float64 for float64 rows, else float32)."""
    wide = str(x2d.dtype) == "float64"
    bf16 = bfm.is_bf16(x2d.dtype)
    key = (wide, bf16)
    if key not in _KERNELS:
        acc = float64 if wide else float32
        _KERNELS[key] = _make(acc, bfm.loader(bf16, "float64" if wide else "float32"),
                              bfm.storer(bf16))
    n = x2d.shape[0]
    if n:
        eps = float64(eps) if wide else float32(eps)
        _KERNELS[key][n, THREADS](bfm.bits(x2d), weight, eps, bfm.bits(out2d))
