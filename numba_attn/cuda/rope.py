"""Rotary embeddings on the GPU (twin of the rotary kernel in :mod:`numba_attn.cpu.cache_ops`).

One thread per channel pair (or passed-through channel) of each token and head, so the
kernel may run in place.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..config import AttentionError

THREADS = 128


@cuda.jit
def _rotary(x, cos, sin, pos, out, interleaved):
    """x, out (T, H, D); cos, sin (P, R/2); pos (T,) int64. Pairs as the CPU kernel."""
    i = cuda.grid(1)
    n_t, n_h, d = x.shape
    r2 = cos.shape[1]
    width = d - r2  # r2 pairs, then d - 2 * r2 passed-through channels
    if i >= n_t * n_h * width:
        return
    t = i // (n_h * width)
    h = (i // width) % n_h
    j = i % width
    if j < r2:
        p = pos[t]
        c = cos[p, j]
        s = sin[p, j]
        if interleaved:
            a = x[t, h, 2 * j]
            b = x[t, h, 2 * j + 1]
            out[t, h, 2 * j] = a * c - b * s
            out[t, h, 2 * j + 1] = b * c + a * s
        else:
            a = x[t, h, j]
            b = x[t, h, j + r2]
            out[t, h, j] = a * c - b * s
            out[t, h, j + r2] = b * c + a * s
    else:
        ch = j + r2
        out[t, h, ch] = x[t, h, ch]


def rotate(x, cos, sin, pos, interleaved, out=None):
    """x (T, H, D) device array (float16/32/64); cos/sin host or device tables.

    Host tables are gathered at ``pos`` first (only T rows travel to the device), in
    float64 for float64 x and float32 otherwise (float16 x is rotated in float32).
    """
    dt = np.dtype(x.dtype)
    tdt = np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)
    if hasattr(cos, "copy_to_host") or hasattr(cos, "__cuda_array_interface__"):
        cos_d, sin_d = cuda.as_cuda_array(cos) if not hasattr(cos, "copy_to_host") else cos, \
            cuda.as_cuda_array(sin) if not hasattr(sin, "copy_to_host") else sin
        pos_d = cuda.to_device(np.ascontiguousarray(pos, dtype=np.int64))
    else:
        cos_d = cuda.to_device(np.ascontiguousarray(np.asarray(cos)[pos], dtype=tdt))
        sin_d = cuda.to_device(np.ascontiguousarray(np.asarray(sin)[pos], dtype=tdt))
        pos_d = cuda.to_device(np.arange(len(pos), dtype=np.int64))
    if out is None:
        out = cuda.device_array(x.shape, dt)
    n = x.shape[0] * x.shape[1] * (x.shape[2] - cos_d.shape[1])
    if n:
        blocks = -(-n // THREADS)
        _rotary[blocks, THREADS](x, cos_d, sin_d, pos_d, out, bool(interleaved))
    return out


def canonical(x, cdt):
    """A C-contiguous float16/32/64 numba device array viewing ``x`` (rotated in ``cdt``)."""
    xd = x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)
    if np.dtype(xd.dtype) not in (np.float16, np.float32, np.float64):
        raise TypeError(f"x: {np.dtype(xd.dtype)} device arrays are not supported by the "
                        "cuda kernels (float16, float32, float64)")
    if not xd.is_c_contiguous():
        raise AttentionError("x: a device array must be C-contiguous; copy it on the device "
                             "first")
    return xd


def finish(y, dt):
    """The result in the input's dtype (the kernel already wrote that dtype)."""
    return y
