"""Host-side planning shared by the CPU and CUDA launchers.

Work items over a Problem's rows, the owner row of each storage row, and the kernels'
option arguments (scale, masking codes, softcap, optional inputs with their presence
flags, dropout constants) are built once here, in the same order for every backend, so
the CPU and CUDA kernels cannot read a Problem differently. Nothing here checks
arguments: the Problem is already valid.
"""
from __future__ import annotations

import numpy as np

from . import dropout as dr
from ._jit import jit
from .masking import CAUSAL_CODES

__all__ = ["make_items", "blocks", "token_rows", "dummy", "codes", "options",
           "dropout_args"]


@jit
def make_items(rows, block_q):
    """(n, 3) int64 work items: (batch row, first query, end query) per query block."""
    n = 0
    for b in range(rows.shape[0]):
        n += (rows[b, 1] + block_q - 1) // block_q
    items = np.empty((n, 3), np.int64)
    t = 0
    for b in range(rows.shape[0]):
        for i0 in range(rows[b, 0], rows[b, 0] + rows[b, 1], block_q):
            items[t, 0] = b
            items[t, 1] = i0
            items[t, 2] = min(i0 + block_q, rows[b, 0] + rows[b, 1])
            t += 1
    return items


def blocks(rows, start_col, len_col, size):
    """(n, 3) int64 work items (batch row, first storage row, end) of ``size`` rows over
    the rows' queries (columns 0, 1) or keys (columns 2, 3)."""
    out = []
    for b in range(rows.shape[0]):
        s0, ln = int(rows[b, start_col]), int(rows[b, len_col])
        for x in range(s0, s0 + max(ln, 0), size):
            out.append((b, x, min(x + size, s0 + ln)))
    return np.array(out, np.int64).reshape(-1, 3)


def token_rows(rows, n, start_col, len_col):
    """(n,) int64: batch row of each storage row (-1 where none)."""
    out = np.full(n, -1, np.int64)
    for b in range(rows.shape[0]):
        s0, ln = int(rows[b, start_col]), int(rows[b, len_col])
        out[s0:s0 + max(ln, 0)] = b
    return out


_EMPTY = {}


def dummy(dtype, ndim=1):
    """A (1,) * ndim zero array standing in for an absent optional input (one per dtype
    and rank, so a call pattern never makes a new array type)."""
    try:  # the hot path: a dtype (or scalar type) seen before, no np.dtype() call
        return _EMPTY[dtype, ndim]
    except (KeyError, TypeError):
        pass
    a = _EMPTY.get((np.dtype(dtype).str, ndim))
    if a is None:
        a = _EMPTY[np.dtype(dtype).str, ndim] = np.zeros((1,) * ndim, dtype=dtype)
    try:
        _EMPTY[dtype, ndim] = a
    except TypeError:  # an unhashable dtype spelling
        pass
    return a


def codes(p):
    """(causal code, window left, window right) as int64."""
    cfg = p.config
    return (np.int64(CAUSAL_CODES[cfg.causal]), np.int64(cfg.window[0]),
            np.int64(cfg.window[1]))


def options(p):
    """The kernels' option arguments, in their order: scale, causal code, window left,
    window right, softcap, slopes, has_slopes, bias, bias strides, has_bias, mask, mask
    strides, has_mask (absent inputs as :func:`dummy` arrays, host arrays)."""
    cfg = p.config
    dt = p.compute_dtype
    return (dt.type(cfg.scale), *codes(p), dt.type(cfg.softcap),
            p.slopes if p.slopes is not None else dummy(dt, 2), p.slopes is not None,
            p.bias if p.bias is not None else dummy(dt),
            p.bias_strides if p.bias is not None else dummy(np.int64), p.bias is not None,
            p.mask if p.mask is not None else dummy(np.bool_),
            p.mask_strides if p.mask is not None else dummy(np.int64), p.mask is not None)


def dropout_args(p, dropout_p, seed):
    """(seed, keep threshold, 1 / (1 - p)) as the dropout kernels read them."""
    dt = p.compute_dtype
    return (np.uint64(seed), np.uint64(dr.threshold(dropout_p)),
            dt.type(1.0 / (1.0 - dropout_p)))
