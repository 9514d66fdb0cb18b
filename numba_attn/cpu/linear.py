"""Projections of a few tokens (decode steps): ``x @ w.T`` as a parallel GEMV.

numpy's BLAS would do the same work, but its worker threads keep spinning for a while
after each call, and the attention kernel that follows (Numba's OpenMP threads) then
shares the cores with them: a Llama-3-8B block's attention took 10.8 ms after numpy
projections against 1.6 ms alone (measured on this 2-core machine). Running the
projections on the same thread pool as the attention avoids that fight.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import jit
from .expmath import _i32_as_f32

ROWS_PER_ITEM = 32  # output features per work item


@jit(parallel=True)
def gemv(x, w, out):
    """out[t, o] = sum_i x[t, i] w[o, i]; x (T, in), w (out, in), out (T, out), T small."""
    n_t, n_in = x.shape
    n_out = w.shape[0]
    n_items = (n_out + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    for it in prange(n_items):
        zero = np.zeros(1, out.dtype)[0]
        for o in range(it * ROWS_PER_ITEM, min(n_out, (it + 1) * ROWS_PER_ITEM)):
            wrow = w[o]
            for t in range(n_t):
                acc = zero
                for i in range(n_in):
                    acc += x[t, i] * wrow[i]
                out[t, o] = acc


@jit(parallel=True)
def gemv_bf16(x, w_bits, out):
    """As :func:`gemv` for float32 ``x`` and bfloat16 weights given as their uint16 bits
    ``w_bits`` (out, in): each weight is widened in registers (``bits << 16`` reinterpreted
    as float32, exact), so the weights are read at 2 bytes each and never copied."""
    n_t, n_in = x.shape
    n_out = w_bits.shape[0]
    n_items = (n_out + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    for it in prange(n_items):
        for o in range(it * ROWS_PER_ITEM, min(n_out, (it + 1) * ROWS_PER_ITEM)):
            wrow = w_bits[o]
            for t in range(n_t):
                acc = np.float32(0.0)
                for i in range(n_in):
                    acc += x[t, i] * _i32_as_f32(np.uint32(wrow[i]) << np.uint32(16))
                out[t, o] = acc
