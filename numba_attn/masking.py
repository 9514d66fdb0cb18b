"""Positional visibility (causal, window) shared by the CPU and CUDA kernels.

Plain Python, compiled for each target where it is used (``register_jitable`` on the CPU,
a ``cuda.jit`` device function on the GPU), so the two backends cannot drift apart.
Positions are in-row: query ``i`` sits at key position ``i + off``
(``off = seqlen_k - seqlen_q``, bottom-right alignment).
"""
from __future__ import annotations

CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT, CAUSAL_TOP_LEFT = 0, 1, 2
CAUSAL_CODES = {"none": CAUSAL_NONE, "bottom_right": CAUSAL_BOTTOM_RIGHT,
                "top_left": CAUSAL_TOP_LEFT}


def key_range(i0, i1, off, klen, causal, wl, wr):
    """Union over queries i0..i1-1 of their visible key positions, as [lo, hi).

    For a single query (``i1 = i0 + 1``) it is exactly that query's visible range.
    """
    hi = klen
    if causal == 1:
        hi = min(hi, i1 + off)
    elif causal == 2:
        hi = min(hi, i1)
    if wr >= 0:
        hi = min(hi, i1 + off + wr)
    lo = 0
    if wl >= 0:
        lo = max(lo, i0 + off - wl)
    return lo, hi


def make_query_range(key_range):
    """``query_range(j, lq, off, klen, causal, wl, wr)`` over a target's compiled
    :func:`key_range` (CPU: the ``register_jitable`` one, CUDA: a device function).

    The inverse of key_range, derived from it (so the visibility rule exists once):
    queries [ilo, ihi) of a row of ``lq`` queries whose visible key range holds key ``j``.
    Both ends of key_range are non-decreasing in the query, so two binary searches find it.
    """
    def query_range(j, lq, off, klen, causal, wl, wr):
        lo_i, hi_i = 0, lq  # first i with hi(i) > j
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            if key_range(mid, mid + 1, off, klen, causal, wl, wr)[1] > j:
                hi_i = mid
            else:
                lo_i = mid + 1
        ilo = lo_i
        lo_i, hi_i = ilo, lq  # first i >= ilo with lo(i) > j
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            if key_range(mid, mid + 1, off, klen, causal, wl, wr)[0] > j:
                hi_i = mid
            else:
                lo_i = mid + 1
        return ilo, lo_i

    return query_range


def tile_needs_mask(i0, i1, j0, j1, off, causal, wl, wr):
    """False when every query in [i0, i1) sees every key in [j0, j1) positionally."""
    if causal == 1 and j1 - 1 > i0 + off:
        return True
    if causal == 2 and j1 - 1 > i0:
        return True
    if wr >= 0 and j1 - 1 > i0 + off + wr:
        return True
    if wl >= 0 and j0 < i1 - 1 + off - wl:
        return True
    return False


def split_range(lo, hi, nsplit, split, align):
    """Keys [js, je) of split ``split`` of ``nsplit`` over [lo, hi), in ``align``-sized tiles.

    Parts are equal multiples of ``align``; trailing parts may be empty (js >= je).
    """
    chunk = (max(hi - lo, 0) + nsplit - 1) // nsplit
    chunk = (chunk + align - 1) // align * align
    js = lo + split * chunk
    return js, min(hi, js + chunk)


def storage_row(b, j, k_start, block_table, block_size):
    """Storage row of key ``j`` of batch row ``b`` (contiguous stores: one huge block)."""
    return k_start + block_table[b, j // block_size] * block_size + j % block_size
