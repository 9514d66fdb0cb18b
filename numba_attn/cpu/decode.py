"""Split-KV decode on the CPU (flash-decoding): few queries per row, a long cache.

Same arguments as :func:`numba_attn.cpu.forward.flash_forward` (launch.py routes its
non-BLAS calls here), same storage addressing (see forward.py's module docstring), same
masking/softcap/ALiBi/bias/sinks helpers. What differs is the order of memory traffic:

* a work item is (query block, key split) and covers **all** kv heads, so keys and values
  are streamed as whole storage rows ``k[row, :, :]`` (contiguous ``Hkv * D`` values).
  Reading one head's slice ``k[row, h]`` per item instead jumps ``Hkv * D`` values from
  row to row and defeats the hardware prefetchers (about 4x slower on this machine);
* runs of keys that are contiguous in storage (a page, or the whole contiguous row) are
  walked without per-key block-table division;
* scores take four keys by four query rows per pass, value updates four keys per pass
  over an accumulator row (a quarter of the accumulator load/store traffic);
* the kernel picks its own number of key splits from the shape (each split writes
  a partial output and lse to scratch, merged with the LSE rule inside the kernel), so a
  single sequence keeps every thread busy. The launcher passes ``nsplit = 1`` (its own
  split arguments are unused here).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import inline, jit
from .atomics import fetch_add
from .forward import (
    fixup_tile,
    init_rows,
    init_state,
    key_range,
    merge_split_row,
    online_softmax,
    split_range,
    tile_needs_mask,
    write_rows,
)
from .halfs import ld

TILE = 32  # keys per tile: scores of all rows for one tile stay in L1
MIN_SPLIT_KEYS = 512  # fewer keys per split do not pay for the merge
TARGET_WORK = 16  # work items wanted per call: enough to balance up to ~8 threads


@inline
def _dot4x4(qs, r, k0, k1, k2, k3, s, jj, d, zero):
    """Scores of query rows r..r+3 against four key vectors: 16 dot products, one pass."""
    q0 = qs[r]
    q1 = qs[r + 1]
    q2 = qs[r + 2]
    q3 = qs[r + 3]
    a00 = a01 = a02 = a03 = zero
    a10 = a11 = a12 = a13 = zero
    a20 = a21 = a22 = a23 = zero
    a30 = a31 = a32 = a33 = zero
    for c in range(d):
        x0 = ld(k0, c)
        x1 = ld(k1, c)
        x2 = ld(k2, c)
        x3 = ld(k3, c)
        y = q0[c]
        a00 += y * x0
        a01 += y * x1
        a02 += y * x2
        a03 += y * x3
        y = q1[c]
        a10 += y * x0
        a11 += y * x1
        a12 += y * x2
        a13 += y * x3
        y = q2[c]
        a20 += y * x0
        a21 += y * x1
        a22 += y * x2
        a23 += y * x3
        y = q3[c]
        a30 += y * x0
        a31 += y * x1
        a32 += y * x2
        a33 += y * x3
    s[jj, r] = a00
    s[jj + 1, r] = a01
    s[jj + 2, r] = a02
    s[jj + 3, r] = a03
    s[jj, r + 1] = a10
    s[jj + 1, r + 1] = a11
    s[jj + 2, r + 1] = a12
    s[jj + 3, r + 1] = a13
    s[jj, r + 2] = a20
    s[jj + 1, r + 2] = a21
    s[jj + 2, r + 2] = a22
    s[jj + 3, r + 2] = a23
    s[jj, r + 3] = a30
    s[jj + 1, r + 3] = a31
    s[jj + 2, r + 3] = a32
    s[jj + 3, r + 3] = a33


@inline
def _scores(qs, k, rowidx, nk, n_kv, nrg, s, d, zero):
    """s[jj, r] = qs[r] . k[rowidx[jj], r // nrg] for the tile's keys jj < nk, all rows.

    Keys outer, kv heads inner: storage rows are read front to back (prefetch-friendly).
    Four keys by four query rows per pass: 8 loads feed 16 FMAs.
    """
    n4 = nk - nk % 4
    for jj in range(0, n4, 4):
        for kvh in range(n_kv):
            k0 = k[rowidx[jj], kvh]
            k1 = k[rowidx[jj + 1], kvh]
            k2 = k[rowidx[jj + 2], kvh]
            k3 = k[rowidx[jj + 3], kvh]
            r = kvh * nrg
            r_end = r + nrg
            while r + 4 <= r_end:
                _dot4x4(qs, r, k0, k1, k2, k3, s, jj, d, zero)
                r += 4
            for r in range(r, r_end):
                qr = qs[r]
                a0 = zero
                a1 = zero
                a2 = zero
                a3 = zero
                for c in range(d):
                    qc = qr[c]
                    a0 += qc * ld(k0, c)
                    a1 += qc * ld(k1, c)
                    a2 += qc * ld(k2, c)
                    a3 += qc * ld(k3, c)
                s[jj, r] = a0
                s[jj + 1, r] = a1
                s[jj + 2, r] = a2
                s[jj + 3, r] = a3
    for jj in range(n4, nk):
        for kvh in range(n_kv):
            k0 = k[rowidx[jj], kvh]
            for r in range(kvh * nrg, (kvh + 1) * nrg):
                qr = qs[r]
                a0 = zero
                for c in range(d):
                    a0 += qr[c] * ld(k0, c)
                s[jj, r] = a0


@inline
def _values(acc, v, rowidx, nk, n_kv, nrg, s, dv):
    """acc[r] += sum_jj s[jj, r] * v[rowidx[jj], r // nrg] over the tile's keys jj < nk.

    Same order as :func:`_scores`; four keys per pass over an accumulator row: a quarter
    of the load/store traffic of one axpy per key (that traffic, not the FMAs, is the
    bottleneck).
    """
    n4 = nk - nk % 4
    for jj in range(0, n4, 4):
        for kvh in range(n_kv):
            v0 = v[rowidx[jj], kvh]
            v1 = v[rowidx[jj + 1], kvh]
            v2 = v[rowidx[jj + 2], kvh]
            v3 = v[rowidx[jj + 3], kvh]
            for r in range(kvh * nrg, (kvh + 1) * nrg):
                p0 = s[jj, r]
                p1 = s[jj + 1, r]
                p2 = s[jj + 2, r]
                p3 = s[jj + 3, r]
                if p0 == 0.0 and p1 == 0.0 and p2 == 0.0 and p3 == 0.0:
                    continue
                ar = acc[r]
                for c in range(dv):
                    ar[c] += p0 * ld(v0, c) + p1 * ld(v1, c) + p2 * ld(v2, c) + p3 * ld(v3, c)
    for jj in range(n4, nk):
        for kvh in range(n_kv):
            v0 = v[rowidx[jj], kvh]
            for r in range(kvh * nrg, (kvh + 1) * nrg):
                p0 = s[jj, r]
                if p0 != 0.0:
                    ar = acc[r]
                    for c in range(dv):
                        ar[c] += p0 * ld(v0, c)


@inline
def _splits(n_items, span_max):
    """Key splits per query block: about TARGET_WORK items in all, >= MIN_SPLIT_KEYS keys each.

    (The thread count is not read here: numba.get_num_threads() inside a kernel would
    stop it from being cached on disk.)
    """
    if n_items >= TARGET_WORK or span_max < 2 * MIN_SPLIT_KEYS:
        return 1
    want = (TARGET_WORK + n_items - 1) // n_items
    return max(1, min(want, span_max // MIN_SPLIT_KEYS, 64))


@jit(parallel=True)
def flash_decode(q, k, v, out, lse, part_out, part_lse, rows, items, block_table, block_size,
                 scale, causal, wl, wr, softcap, slopes, has_alibi, bias, bstr, has_bias,
                 mask, mstr, has_mask, sinks, has_sinks, nsplit, block_k, use_blas,
                 kpack, vpack, packed):
    """Decode forward; arguments as :func:`numba_attn.cpu.forward.flash_forward`.

    ``block_k``, ``use_blas`` and the head-major copies ``kpack``/``vpack``/``packed`` are
    ignored (tiles are :data:`TILE` keys read in place, no BLAS).
    """
    dt = q.dtype
    tq, n_heads, d = q.shape
    n_kv, dv = k.shape[1], v.shape[2]
    group = n_heads // n_kv
    n_items = items.shape[0]
    span_max = 0
    for it in range(n_items):
        b = items[it, 0]
        lo, hi = key_range(items[it, 1] - rows[b, 0], items[it, 2] - rows[b, 0], rows[b, 4],
                           rows[b, 3], causal, wl, wr)
        span_max = max(span_max, hi - lo)
    ns = _splits(n_items, span_max)
    if ns > 1:
        pout = np.empty((ns, tq, n_heads, dv), dt)
        plse = np.empty((ns, tq, n_heads), dt)
    else:
        pout = np.empty((1, 1, 1, 1), dt)
        plse = np.empty((1, 1, 1), dt)
    # lanes pull work items through a shared counter: a thread the machine slows down
    # takes fewer of them (numba.get_num_threads() here would make the kernel uncacheable,
    # so there is one lane per item, up to 64; idle lanes find the counter exhausted)
    counter = np.zeros(1, np.int64)
    for lane in prange(min(n_items * ns, 64)):
        while True:
            w = fetch_add(counter, 0, 1)
            if w >= n_items * ns:
                break
            split = w % ns
            it = w // ns
            b, i_first, i_end = items[it, 0], items[it, 1], items[it, 2]
            q_start, k_start, klen, off = rows[b, 0], rows[b, 2], rows[b, 3], rows[b, 4]
            i0 = i_first - q_start
            i1 = i_end - q_start
            nq = i1 - i0
            nrg = group * nq  # rows per kv head: r = kvh * nrg + g * nq + (i - i0)
            nr = n_kv * nrg
            lo, hi = key_range(i0, i1, off, klen, causal, wl, wr)
            js, je = split_range(lo, hi, ns, split, TILE)

            zero = np.zeros(1, dt)[0]
            hh = np.empty(nr, np.int64)  # query head of each row
            for r in range(nr):
                hh[r] = (r // nrg) * group + (r % nrg) // nq
            qs, qi, rlo, rhi, slope_r = init_rows(q, q_start, i0, nq, hh, off, klen, causal, wl, wr,
                                                  scale, slopes, has_alibi, b)
            m, mu, l, alpha, tmax, junk, acc = init_state(nr, dv, hh, sinks, has_sinks, split, dt)
            sbuf = np.empty(TILE * nr, dt)
            rowidx = np.empty(TILE, np.int64)
            for j0 in range(js, je, TILE):
                j1 = min(j0 + TILE, je)
                nk = j1 - j0
                s = sbuf[: nk * nr].reshape((nk, nr))  # scores, (keys, rows)
                # storage rows of the tile's keys (runs of contiguous keys: no per-key division)
                j = j0
                while j < j1:
                    blk = j // block_size
                    within = j - blk * block_size
                    run = min(block_size - within, j1 - j)
                    base = k_start + block_table[b, blk] * block_size + within
                    for u in range(run):
                        rowidx[j - j0 + u] = base + u
                    j += run
                _scores(qs, k, rowidx, nk, n_kv, nrg, s, d, zero)
                positional = tile_needs_mask(i0, i1, j0, j1, off, causal, wl, wr)
                fixup_tile(s, nk, nr, j0, b, qi, hh, rlo, rhi, slope_r, off, positional, softcap,
                           has_alibi, bias, bstr, has_bias, mask, mstr, has_mask)
                online_softmax(s, nk, m, mu, l, alpha, tmax, junk)
                for r in range(nr):
                    a = alpha[r]
                    if a != 1.0:
                        for c in range(dv):
                            acc[r, c] *= a
                _values(acc, v, rowidx, nk, n_kv, nrg, s, dv)
            write_rows(acc, m, l, qi, hh, q_start, split, ns, out, lse, pout, plse)
    if ns > 1:
        tq, n_heads = pout.shape[1], pout.shape[2]
        for w in prange(tq * n_heads):
            merge_split_row(pout, plse, out, lse, w // n_heads, w % n_heads)
