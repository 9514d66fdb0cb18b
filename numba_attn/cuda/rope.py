"""Rotary embeddings on the GPU (twin of :mod:`numba_attn.cpu.rope`).

One thread per channel pair (or passed-through channel) of each token and head, so the
kernel may run in place.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..config import AttentionError
from . import bf16 as bfm

THREADS = 128


def _make_rotary(LOAD, STORE):
    @cuda.jit
    def rotary(x, cos, sin, pos, out, interleaved):
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
                a = LOAD(x[t, h, 2 * j])
                b = LOAD(x[t, h, 2 * j + 1])
                out[t, h, 2 * j] = STORE(a * c - b * s)
                out[t, h, 2 * j + 1] = STORE(b * c + a * s)
            else:
                a = LOAD(x[t, h, j])
                b = LOAD(x[t, h, j + r2])
                out[t, h, j] = STORE(a * c - b * s)
                out[t, h, j + r2] = STORE(b * c + a * s)
        else:
            ch = j + r2
            out[t, h, ch] = x[t, h, ch]

    return rotary


_keep = bfm.storer(False)  # float16/32/64: the arithmetic and the array store convert
_rotary = _make_rotary(_keep, _keep)
_rotary_bf16 = _make_rotary(bfm.load, bfm.store)  # x, out as bfloat16 bits


def rotate(x, cos, sin, pos, interleaved, out=None):
    """x (T, H, D) device array (float16/bfloat16/32/64); cos/sin host or device tables.

    Host tables are gathered at ``pos`` first (only T rows travel to the device), in
    float64 for float64 x and float32 otherwise (float16 and bfloat16 x are rotated in
    float32, the result rounded to x's dtype).
    """
    dt = np.dtype(x.dtype)
    bf16 = bfm.is_bf16(dt)
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
        out = cuda.device_array(x.shape, bfm.BITS if bf16 else dt)
        out = bfm.from_bits(out) if bf16 else out
    n = x.shape[0] * x.shape[1] * (x.shape[2] - cos_d.shape[1])
    if n:
        blocks = -(-n // THREADS)
        kern, xs, os_ = (_rotary_bf16, bfm.bits(x), bfm.bits(out)) if bf16 else (_rotary, x, out)
        kern[blocks, THREADS](xs, cos_d, sin_d, pos_d, os_, bool(interleaved))
    return out


def canonical(x, cdt):
    """A C-contiguous float16/bfloat16/32/64 numba device array viewing ``x`` (rotated in
    ``cdt``)."""
    if type(x).__module__.split(".")[0] == "torch" and bfm.is_bf16(x.dtype):
        xd = bfm.from_bits(bfm.bits(x))
    else:
        xd = x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)
    if np.dtype(xd.dtype) not in (np.float16, np.float32, np.float64) and \
            not bfm.is_bf16(xd.dtype):
        raise TypeError(f"x: {np.dtype(xd.dtype)} device arrays are not supported by the "
                        "cuda kernels (float16, bfloat16, float32, float64)")
    if not xd.is_c_contiguous():
        raise AttentionError("x: a device array must be C-contiguous; copy it on the device "
                             "first")
    return xd
