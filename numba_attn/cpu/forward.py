"""Flash-attention forward on the CPU: ``prange`` over (row, query block, kv head, split).

One work item holds all query heads of one GQA group for a block of queries and streams
K/V tiles once for the whole group (K/V are never repeated). Scores of a tile are formed
either by BLAS (``np.dot`` into scratch, for many rows) or by direct dot products read
straight from the K/V storage (for decode-sized items); both then run the same online
softmax with a vectorised ``exp``. Tiles that no query of the block can see are skipped;
positional masks are evaluated only on boundary tiles. Nothing of size seqlen_q x seqlen_k
is ever allocated.

Storage is addressed uniformly: key ``j`` of batch row ``b`` lives in storage row
``k_start[b] + block_table[b, j // block_size] * block_size + j % block_size``
(a contiguous or packed cache uses one huge block and a zero block table).

``rows`` is int64 ``(batch, 5)``: query start, query count, key start, visible key count
(padding removed), alignment offset (query ``i`` sits at key position ``i + off``).
``items`` is int64 ``(n, 3)``: batch row, first query, end query of each query block.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from .. import masking
from .._jit import inline, jit
from .atomics import fetch_add
from .expmath import exp_diff_acc
from .halfs import ld

key_range = inline(masking.key_range)
tile_needs_mask = inline(masking.tile_needs_mask)
storage_row = inline(masking.storage_row)
split_range = inline(masking.split_range)


@inline
def fixup_tile(st, nk, nr, j0, b, qi, hh, rlo, rhi, slope_r, off, positional, softcap,
               has_alibi, bias, bstr, has_bias, mask, mstr, has_mask):
    """Soft-cap, ALiBi, bias and masking of a (keys, rows) score tile, in DESIGN.md's order."""
    ninf = -np.inf
    if softcap > 0.0:
        inv = 1.0 / softcap
        for jj in range(nk):
            for r in range(nr):
                st[jj, r] = softcap * math.tanh(st[jj, r] * inv)
    if has_alibi:
        for jj in range(nk):
            j = j0 + jj
            for r in range(nr):
                st[jj, r] -= slope_r[r] * abs(qi[r] + off - j)
    if has_bias:
        for jj in range(nk):
            jb = b * bstr[0] + (j0 + jj) * bstr[3]
            for r in range(nr):
                st[jj, r] += bias[jb + hh[r] * bstr[1] + qi[r] * bstr[2]]
    if has_mask:
        for jj in range(nk):
            jb = b * mstr[0] + (j0 + jj) * mstr[3]
            for r in range(nr):
                if not mask[jb + hh[r] * mstr[1] + qi[r] * mstr[2]]:
                    st[jj, r] = ninf
    if positional:
        for jj in range(nk):
            j = j0 + jj
            for r in range(nr):
                if j < rlo[r] or j >= rhi[r]:
                    st[jj, r] = ninf


@inline
def init_rows(q, q_start, i0, nq, hh, off, klen, causal, wl, wr, scale, slopes, has_alibi, b):
    """Per-row data of a work item whose row ``r`` is query ``i0 + r % nq`` of head ``hh[r]``.

    Returns qs (rows, D) = scale * q, in-row query positions, each row's visible key range
    [rlo, rhi) and ALiBi slope.
    """
    nr = hh.shape[0]
    dt = q.dtype
    qs = np.empty((nr, q.shape[2]), dt)
    qi = np.empty(nr, np.int64)
    rlo = np.empty(nr, np.int64)
    rhi = np.empty(nr, np.int64)
    slope_r = np.zeros(nr, dt)
    for r in range(nr):
        i = i0 + r % nq
        h = hh[r]
        qi[r] = i
        rlo[r], rhi[r] = key_range(i, i + 1, off, klen, causal, wl, wr)
        if has_alibi:
            slope_r[r] = slopes[b if slopes.shape[0] > 1 else 0, h]
        for c in range(q.shape[2]):
            qs[r, c] = q[q_start + i, h, c] * scale
    return qs, qi, rlo, rhi, slope_r


@inline
def init_state(nr, dv, hh, sinks, has_sinks, split, dt):
    """Online-softmax state of ``nr`` rows: max, exp shift, sum, scratch, accumulator.

    A sink starts a row at ``m = sink, l = 1`` (its ``exp(sink)`` term), in split 0 only.
    """
    m = np.full(nr, -np.inf, dt)  # running max
    mu = np.zeros(nr, dt)  # exp shift: m where finite, else 0 (so exp(-inf - mu) = 0)
    l = np.zeros(nr, dt)
    alpha = np.empty(nr, dt)
    tmax = np.empty(nr, dt)
    junk = np.zeros(nr, dt)
    acc = np.zeros((nr, dv), dt)
    if has_sinks and split == 0:
        for r in range(nr):
            m[r] = sinks[hh[r]]
            mu[r] = m[r]
            l[r] = 1.0
    return m, mu, l, alpha, tmax, junk, acc


@inline
def online_softmax(st, nk, m, mu, l, alpha, tmax, junk):
    """One (keys, rows) score tile: st becomes p = exp(s - m_new), l is rescaled and grows,
    alpha = exp(m_old - m_new) is left for the caller to rescale its accumulator.

    Every loop runs across rows (contiguous), so each vectorises.
    """
    nr = st.shape[1]
    for r in range(nr):
        tmax[r] = st[0, r]
    for jj in range(1, nk):
        srow = st[jj]
        for r in range(nr):
            x = srow[r]
            tmax[r] = x if x > tmax[r] else tmax[r]
    for r in range(nr):
        alpha[r] = m[r]
        mn = tmax[r] if tmax[r] > m[r] else m[r]
        m[r] = mn
        mu[r] = mn if mn > -np.inf else 0.0
    exp_diff_acc(alpha, mu, nr, junk)  # alpha = exp(m_old - m_new)
    for r in range(nr):
        l[r] *= alpha[r]
    for jj in range(nk):
        exp_diff_acc(st[jj], mu, nr, l)  # p = exp(s - m); l += p


@inline
def write_rows(acc, m, l, qi, hh, q_start, split, nsplit, out, lse, part_out, part_lse):
    """Normalise an item's accumulators into out/lse (or split ``split``'s partials)."""
    for r in range(acc.shape[0]):
        t = q_start + qi[r]
        h = hh[r]
        if l[r] > 0.0:
            inv = 1.0 / l[r]
            lv = m[r] + math.log(l[r])
        else:  # no visible key (and no sink): out = 0, lse = -inf
            inv = 0.0
            lv = -np.inf
        if nsplit == 1:
            for c in range(acc.shape[1]):
                out[t, h, c] = acc[r, c] * inv
            lse[t, h] = lv
        else:
            for c in range(acc.shape[1]):
                part_out[split, t, h, c] = acc[r, c] * inv
            part_lse[split, t, h] = lv


@jit(parallel=True)
def flash_forward(q, k, v, out, lse, part_out, part_lse, rows, items, block_table, block_size,
                  scale, causal, wl, wr, softcap, slopes, has_alibi, bias, bstr, has_bias,
                  mask, mstr, has_mask, sinks, has_sinks, nsplit, block_k, use_blas,
                  kpack, vpack, packed, schedule, n_lanes):
    """Forward pass (BLAS tiles); see the module docstring for rows/items/addressing.

    ``use_blas`` is always True here (decode-sized work goes to decode.flash_decode, which
    takes the same arguments up to ``packed``).

    With ``packed`` (contiguous storage only), kpack (Hkv, N, D) / vpack (Hkv, N, Dv) are
    head-major copies of k / v, so BLAS reads key tiles in place instead of gathering them.

    q (Tq, H, D), k (N, Hkv, D), v (N, Hkv, Dv), out (Tq, H, Dv), lse (Tq, H).
    With ``nsplit > 1`` each item's key range is cut into ``nsplit`` parts written to
    part_out (nsplit, Tq, H, Dv) / part_lse (nsplit, Tq, H) for :func:`merge_splits`.

    Work items ``w`` (= (item * Hkv + kv head) * nsplit + split) are taken in the order
    of ``schedule`` (decreasing cost, from the launcher) by ``n_lanes`` lanes (one per
    thread) through an atomic counter: largest first, and a thread that the machine slows
    down takes fewer items instead of holding up the call.

    Score tiles are kept transposed, (keys, rows), so that the online-softmax steps (tile
    max, exp, row sums, rescale) are element-wise across rows and vectorise.
    """
    dt = q.dtype
    n_heads, d = q.shape[1], q.shape[2]
    n_kv, dv = k.shape[1], v.shape[2]
    group = n_heads // n_kv
    n_items = items.shape[0]
    n_work = n_items * n_kv * nsplit
    counter = np.zeros(1, np.int64)  # next index into schedule, shared by the lanes
    for lane in prange(n_lanes):
        while True:
            idx = fetch_add(counter, 0, 1)
            if idx >= n_work:
                break
            w = schedule[idx]
            split = w % nsplit
            kvh = (w // nsplit) % n_kv
            it = w // (nsplit * n_kv)
            b, i_first, i_end = items[it, 0], items[it, 1], items[it, 2]
            q_start, k_start, klen, off = rows[b, 0], rows[b, 2], rows[b, 3], rows[b, 4]
            i0 = i_first - q_start  # in-row query positions [i0, i1)
            i1 = i_end - q_start
            nq = i1 - i0
            nr = group * nq  # rows of this item: r = g * nq + (i - i0)
            lo, hi = key_range(i0, i1, off, klen, causal, wl, wr)
            js, je = split_range(lo, hi, nsplit, split, block_k)

            hh = np.empty(nr, np.int64)
            for r in range(nr):
                hh[r] = kvh * group + r // nq
            qs, qi, rlo, rhi, slope_r = init_rows(q, q_start, i0, nq, hh, off, klen, causal,
                                                  wl, wr, scale, slopes, has_alibi, b)
            m, mu, l, alpha, tmax, junk, acc = init_state(nr, dv, hh, sinks, has_sinks,
                                                          split, dt)
            sbuf = np.empty(block_k * nr, dt)
            ks = np.empty((block_k, d), dt)
            vs = np.empty((block_k, dv), dt)
            pv = np.empty((nr, dv), dt)
            for j0 in range(js, je, block_k):
                j1 = min(j0 + block_k, je)
                nk = j1 - j0
                st = sbuf[: nk * nr].reshape((nk, nr))
                if packed:
                    kt = kpack[kvh][k_start + j0:k_start + j1]
                    vt = vpack[kvh][k_start + j0:k_start + j1]
                else:  # paged: gather the tile's rows
                    for jj in range(nk):
                        row = storage_row(b, j0 + jj, k_start, block_table, block_size)
                        krow = k[row, kvh]
                        vrow = v[row, kvh]
                        for c in range(d):
                            ks[jj, c] = ld(krow, c)
                        for c in range(dv):
                            vs[jj, c] = ld(vrow, c)
                    kt = ks[:nk]
                    vt = vs[:nk]
                np.dot(kt, qs.T, st)
                positional = tile_needs_mask(i0, i1, j0, j1, off, causal, wl, wr)
                fixup_tile(st, nk, nr, j0, b, qi, hh, rlo, rhi, slope_r, off, positional, softcap,
                           has_alibi, bias, bstr, has_bias, mask, mstr, has_mask)
                online_softmax(st, nk, m, mu, l, alpha, tmax, junk)
                np.dot(st.T, vt, pv)
                for r in range(nr):
                    a = alpha[r]
                    for c in range(dv):
                        acc[r, c] = acc[r, c] * a + pv[r, c]
            write_rows(acc, m, l, qi, hh, q_start, split, nsplit, out, lse, part_out,
                       part_lse)


@inline
def merge_split_row(part_out, part_lse, out, lse, t, h):
    """The LSE rule over the splits of one (query, head); empty parts are the identity."""
    nsplit, dv = part_out.shape[0], part_out.shape[3]
    mx = -np.inf
    for s in range(nsplit):
        mx = max(mx, part_lse[s, t, h])
    for c in range(dv):
        out[t, h, c] = 0.0
    if mx == -np.inf:
        lse[t, h] = -np.inf
        return
    tot = 0.0
    for s in range(nsplit):
        tot += math.exp(part_lse[s, t, h] - mx)
    for s in range(nsplit):
        wgt = math.exp(part_lse[s, t, h] - mx) / tot
        if wgt > 0.0:
            for c in range(dv):
                out[t, h, c] += wgt * part_out[s, t, h, c]
    lse[t, h] = mx + math.log(tot)


@jit(parallel=True)
def merge_splits(part_out, part_lse, out, lse):
    """Combine split partial results (nsplit, Tq, H, Dv) / (nsplit, Tq, H) into out / lse."""
    tq, n_heads = part_out.shape[1], part_out.shape[2]
    for w in prange(tq * n_heads):
        merge_split_row(part_out, part_lse, out, lse, w // n_heads, w % n_heads)


@jit(parallel=True)
def merge_states(out_a, lse_a, out_b, lse_b, out, lse):
    """out (N, S, H, Dv), lse (N, H, S): merge two partial states over disjoint keys."""
    n, sq, n_heads, dv = out_a.shape
    for w in prange(n * sq):
        bi = w // sq
        i = w % sq
        for h in range(n_heads):
            la = lse_a[bi, h, i]
            lb = lse_b[bi, h, i]
            mx = max(la, lb)
            if mx == -np.inf:
                for c in range(dv):
                    out[bi, i, h, c] = 0.0
                lse[bi, h, i] = -np.inf
                continue
            wa = math.exp(la - mx)
            wb = math.exp(lb - mx)
            tot = wa + wb
            wa /= tot
            wb /= tot
            for c in range(dv):
                out[bi, i, h, c] = wa * out_a[bi, i, h, c] + wb * out_b[bi, i, h, c]
            lse[bi, h, i] = mx + math.log(tot)
