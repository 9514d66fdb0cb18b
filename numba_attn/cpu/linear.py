"""Projections of a few tokens (decode steps): ``x @ w.T`` as a parallel GEMV.

numpy's BLAS would do the same work, but its worker threads keep spinning for a while
after each call, and the attention kernel that follows (Numba's OpenMP threads) then
shares the cores with them: a Llama-3-8B block's attention took 10.8 ms after numpy
projections against 1.6 ms alone (measured on this 2-core machine). Running the
projections on the same thread pool as the attention avoids that fight.

A decode GEMV streams the weights from memory once; four output rows are computed
together (four independent read streams and accumulators per loop), which lets one core
keep more cache-line fills in flight than a single row's dot product does (measured here:
about 2x the bytes per second from DRAM). bfloat16 weights are passed as their uint16 bits
and widened in registers (``bits << 16`` reinterpreted as float32, exact), so they are read
at 2 bytes each and never copied.
"""
from __future__ import annotations

import numpy as np
from numba import prange
from numba.core import types
from numba.extending import overload

from .._jit import jit
from .expmath import _i32_as_f32

ROWS_PER_ITEM = 32  # output features per work item (a multiple of ROWS_PER_STEP)
ROWS_PER_STEP = 4  # output rows computed together


def weight(v):
    """A weight element as a float: uint16 holds bfloat16 bits (widened), floats as is."""
    raise NotImplementedError  # jitted code only (overload below)


@overload(weight, inline="always")
def _weight_impl(v):
    if isinstance(v, types.Integer) and v.bitwidth == 16 and not v.signed:
        return lambda v: _i32_as_f32(np.uint32(v) << np.uint32(16))
    return lambda v: v


@jit(parallel=True)
def gemv(x, w, out):
    """out[t, o] = sum_i x[t, i] w[o, i]; x (T, in), w (out, in), out (T, out), T small.

    ``w`` is float32/float64 like ``x``, or uint16 bfloat16 bits with float32 ``x``.
    """
    n_t, n_in = x.shape
    n_out = w.shape[0]
    n_items = (n_out + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    for it in prange(n_items):
        zero = np.zeros(1, out.dtype)[0]
        lo = it * ROWS_PER_ITEM
        hi = min(n_out, lo + ROWS_PER_ITEM)
        for t in range(n_t):
            o = lo
            while o + ROWS_PER_STEP <= hi:
                a0, a1, a2, a3 = zero, zero, zero, zero
                w0, w1, w2, w3 = w[o], w[o + 1], w[o + 2], w[o + 3]
                for i in range(n_in):
                    xi = x[t, i]
                    a0 += xi * weight(w0[i])
                    a1 += xi * weight(w1[i])
                    a2 += xi * weight(w2[i])
                    a3 += xi * weight(w3[i])
                out[t, o], out[t, o + 1], out[t, o + 2], out[t, o + 3] = a0, a1, a2, a3
                o += ROWS_PER_STEP
            for r in range(o, hi):  # the last item's tail rows
                acc = zero
                wr = w[r]
                for i in range(n_in):
                    acc += x[t, i] * weight(wr[i])
                out[t, r] = acc
