"""Counter-based attention dropout: the keep bit of element (b, h, i, j) is a pure function
of (seed, b, h, i, j), so forward, backward, CPU, CUDA, any tiling and any thread count agree.

The generator is SplitMix64's output function (Steele, Lea, Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014) applied to a Weyl sequence per query row:
``row = mix(mix(mix(seed + G (b + 1)) + G (h + 1)) + G (i + 1))`` and element ``j`` draws
``u = mix(row + G (j + 1)) >> 32``, a uniform 32-bit integer; the element is kept when
``u >= floor(p 2^32)`` and kept values are scaled by ``1 / (1 - p)``. ``b`` is the batch
row (the segment of a varlen call), ``h`` the query head, ``i`` / ``j`` in-row positions.

The functions take and return uint64 values (numpy uint64 *arrays* or Numba uint64
scalars; numpy uint64 scalars warn on wrap-around, arrays do not) and are plain Python so
the CPU kernels (``register_jitable``), the CUDA kernels (device functions) and the numpy
reference all run the same code.
"""
from __future__ import annotations

import numpy as np

from .config import AttentionError, check_int, check_real

__all__ = ["check_dropout", "element_bits", "keep_mask", "mix64", "row_key", "threshold"]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_ONE = np.uint64(1)


def mix64(z):
    """SplitMix64's finaliser (a bijection of uint64)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def row_key(seed, b, h, i):
    """Key of query row (b, h, i) under ``seed`` (all uint64)."""
    z = mix64(seed + GOLDEN * (b + _ONE))
    z = mix64(z + GOLDEN * (h + _ONE))
    return mix64(z + GOLDEN * (i + _ONE))


def element_bits(key, j):
    """The uniform 32-bit draw (as uint64) of key ``j`` in the row of ``key``."""
    return mix64(key + GOLDEN * (j + _ONE)) >> _S32


def threshold(p) -> int:
    """Integer drop threshold of probability ``p``: keep iff draw >= threshold."""
    return int(float(p) * 4294967296.0)


def keep_mask(seed, b, h, i, j, p):
    """numpy: boolean keep mask broadcast over integer arrays b, h, i, j (the reference)."""
    u64 = np.uint64
    bb, hh, ii, jj = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (b, h, i, j)))
    shape = bb.shape
    key = row_key(np.full(bb.size, seed, u64), bb.reshape(-1).astype(u64),
                  hh.reshape(-1).astype(u64), ii.reshape(-1).astype(u64))
    bits = element_bits(key, jj.reshape(-1).astype(u64))
    return (bits >= u64(threshold(p))).reshape(shape)


def check_dropout(dropout_p, seed):
    """Validated (dropout_p float, seed int) ; seed is required when dropout_p > 0.

    Examples
    --------
    >>> from numba_attn.dropout import check_dropout
    >>> check_dropout(0.1, 7)
    (0.1, 7)
    >>> check_dropout(1.0, 7)
    Traceback (most recent call last):
        ...
    numba_attn.config.AttentionError: dropout_p: must lie in [0, 1), got 1.0
    """
    p = check_real("dropout_p", dropout_p)
    if not (0.0 <= p < 1.0):
        raise AttentionError(f"dropout_p: must lie in [0, 1), got {p!r}")
    if seed is None:
        if p > 0.0:
            raise AttentionError("seed: required when dropout_p > 0 (an int in [0, 2**63)); "
                                 "the backward regenerates the mask from it")
        return p, 0
    return p, check_int("seed", seed, lo=0)
