"""KV-cache append on the CPU (the rotary kernel is in :mod:`numba_attn.cpu.rope`).

``append_rows`` copies new tokens into cache storage rows chosen by the caller (a
contiguous cache row or a page slot): O(tokens x heads x head_dim), independent of the
cache length, nothing else in the cache is touched.
"""
from __future__ import annotations

from .._jit import jit


@jit
def append_rows(store, slots, new):
    """store (N, Hkv, D), slots (T,) int64 storage rows, new (T, Hkv, D):
    ``store[slots] = new``."""
    n_h, d = new.shape[1], new.shape[2]
    for t in range(new.shape[0]):
        row = slots[t]
        for h in range(n_h):
            for c in range(d):
                store[row, h, c] = new[t, h, c]
