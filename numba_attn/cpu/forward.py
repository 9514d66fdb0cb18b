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

from .._jit import inline, jit
from .expmath import exp_sub_sum

# causal modes (compile-time-cheap ints shared with the CUDA kernels)
CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT, CAUSAL_TOP_LEFT = 0, 1, 2


@inline
def key_range(i0, i1, off, klen, causal, wl, wr):
    """Union over queries i0..i1-1 of their visible key positions, as [lo, hi)."""
    hi = klen
    if causal == 1:
        hi = min(hi, i1 - 1 + off + 1)
    elif causal == 2:
        hi = min(hi, i1)
    if wr >= 0:
        hi = min(hi, i1 - 1 + off + wr + 1)
    lo = 0
    if wl >= 0:
        lo = max(lo, i0 + off - wl)
    return lo, hi


@inline
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


@inline
def storage_row(b, j, k_start, block_table, block_size):
    return k_start + block_table[b, j // block_size] * block_size + j % block_size


@inline
def score_fixup(srow, nk, i, j0, qi, b, h, off, causal, wl, wr, positional,
                softcap, slope, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask):
    """Soft-cap, ALiBi, bias and masking of one score row, in DESIGN.md's order."""
    ninf = -np.inf
    if softcap > 0.0:
        inv = 1.0 / softcap
        for jj in range(nk):
            srow[jj] = softcap * math.tanh(srow[jj] * inv)
    if has_alibi:
        for jj in range(nk):
            srow[jj] -= slope * abs(i + off - (j0 + jj))
    if has_bias:
        base = b * bstr[0] + h * bstr[1] + qi * bstr[2]
        for jj in range(nk):
            srow[jj] += bias[base + (j0 + jj) * bstr[3]]
    if has_mask:
        base = b * mstr[0] + h * mstr[1] + qi * mstr[2]
        for jj in range(nk):
            if not mask[base + (j0 + jj) * mstr[3]]:
                srow[jj] = ninf
    if positional:
        hi = j0 + nk
        if causal == 1:
            hi = min(hi, i + off + 1)
        elif causal == 2:
            hi = min(hi, i + 1)
        if wr >= 0:
            hi = min(hi, i + off + wr + 1)
        lo = j0
        if wl >= 0:
            lo = max(lo, i + off - wl)
        for jj in range(nk):
            j = j0 + jj
            if j < lo or j >= hi:
                srow[jj] = ninf


@inline
def online_update(srow, nk, r, m, l, alpha, ibuf):
    """Online softmax of one row: exponentiate in place, update max/sum, return rescale."""
    mrow = -np.inf
    for jj in range(nk):
        if srow[jj] > mrow:
            mrow = srow[jj]
    m_new = max(m[r], mrow)
    if m_new == -np.inf:  # nothing visible yet: keep the state, contribute zeros
        for jj in range(nk):
            srow[jj] = 0.0
        alpha[r] = 1.0
        return
    a = math.exp(m[r] - m_new) if m[r] > -np.inf else 0.0
    s = exp_sub_sum(srow, m_new, nk, ibuf)
    l[r] = l[r] * a + s
    m[r] = m_new
    alpha[r] = a


@jit(parallel=True)
def flash_forward(q, k, v, out, lse, part_out, part_lse, rows, items, block_table, block_size,
                  scale, causal, wl, wr, softcap, slopes, has_alibi, bias, bstr, has_bias,
                  mask, mstr, has_mask, sinks, has_sinks, nsplit, block_k, use_blas):
    """Forward pass; see the module docstring for ``rows``/``items``/storage addressing.

    q (Tq, H, D), k (N, Hkv, D), v (N, Hkv, Dv), out (Tq, H, Dv), lse (Tq, H).
    With ``nsplit > 1`` each item's key range is cut into ``nsplit`` parts written to
    part_out (nsplit, Tq, H, Dv) / part_lse (nsplit, Tq, H) for :func:`merge_splits`.
    """
    dt = q.dtype
    n_heads, d = q.shape[1], q.shape[2]
    n_kv, dv = k.shape[1], v.shape[2]
    group = n_heads // n_kv
    n_items = items.shape[0]
    for w in prange(n_items * n_kv * nsplit):
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
        span = max(hi - lo, 0)
        chunk = (span + nsplit - 1) // nsplit
        chunk = (chunk + block_k - 1) // block_k * block_k
        js = lo + split * chunk
        je = min(hi, js + chunk)

        zero = np.zeros(1, dt)[0]
        qs = np.empty((nr, d), dt)
        for g in range(group):
            h = kvh * group + g
            for ii in range(nq):
                for c in range(d):
                    qs[g * nq + ii, c] = q[i_first + ii, h, c] * scale
        m = np.full(nr, -np.inf, dt)
        l = np.zeros(nr, dt)
        alpha = np.ones(nr, dt)
        acc = np.zeros((nr, dv), dt)
        if has_sinks and split == 0:
            for g in range(group):
                for ii in range(nq):
                    m[g * nq + ii] = sinks[kvh * group + g]
                    l[g * nq + ii] = 1.0
        sbuf = np.empty(nr * block_k, dt)
        ibuf = np.empty(block_k, np.int64)
        if use_blas:
            ks = np.empty((block_k, d), dt)
            vs = np.empty((block_k, dv), dt)
            pv = np.empty((nr, dv), dt)
        for j0 in range(js, je, block_k):
            j1 = min(j0 + block_k, je)
            nk = j1 - j0
            s = sbuf[: nr * nk].reshape((nr, nk))
            if use_blas:
                for jj in range(nk):
                    row = storage_row(b, j0 + jj, k_start, block_table, block_size)
                    ks[jj, :] = k[row, kvh]
                    vs[jj, :] = v[row, kvh]
                np.dot(qs, ks[:nk].T, s)
            else:
                for jj in range(nk):
                    krow = k[storage_row(b, j0 + jj, k_start, block_table, block_size), kvh]
                    for r in range(nr):
                        acc_s = zero
                        for c in range(d):
                            acc_s += qs[r, c] * krow[c]
                        s[r, jj] = acc_s
            positional = tile_needs_mask(i0, i1, j0, j1, off, causal, wl, wr)
            for r in range(nr):
                g = r // nq
                i = i0 + r % nq
                h = kvh * group + g
                slope = slopes[b if slopes.shape[0] > 1 else 0, h] if has_alibi else 0.0
                srow = s[r]
                score_fixup(srow, nk, i, j0, i, b, h, off, causal, wl, wr, positional,
                            softcap, slope, has_alibi, bias, bstr, has_bias, mask, mstr,
                            has_mask)
                online_update(srow, nk, r, m, l, alpha, ibuf)
            if use_blas:
                np.dot(s, vs[:nk], pv)
                for r in range(nr):
                    a = alpha[r]
                    for c in range(dv):
                        acc[r, c] = acc[r, c] * a + pv[r, c]
            else:
                for r in range(nr):
                    a = alpha[r]
                    if a != 1.0:
                        for c in range(dv):
                            acc[r, c] *= a
                for jj in range(nk):
                    vrow = v[storage_row(b, j0 + jj, k_start, block_table, block_size), kvh]
                    for r in range(nr):
                        p = s[r, jj]
                        if p != 0.0:
                            for c in range(dv):
                                acc[r, c] += p * vrow[c]
        for r in range(nr):
            g = r // nq
            t = i_first + r % nq
            h = kvh * group + g
            if l[r] > 0.0:
                inv = 1.0 / l[r]
                lv = m[r] + math.log(l[r])
            else:
                inv = 0.0
                lv = -np.inf
            if nsplit == 1:
                for c in range(dv):
                    out[t, h, c] = acc[r, c] * inv
                lse[t, h] = lv
            else:
                for c in range(dv):
                    part_out[split, t, h, c] = acc[r, c] * inv
                part_lse[split, t, h] = lv


@jit(parallel=True)
def merge_splits(part_out, part_lse, out, lse):
    """Combine split partial results with the LSE rule (identity for empty parts)."""
    nsplit, tq, n_heads, dv = part_out.shape
    for w in prange(tq * n_heads):
        t = w // n_heads
        h = w % n_heads
        mx = -np.inf
        for s in range(nsplit):
            mx = max(mx, part_lse[s, t, h])
        if mx == -np.inf:
            for c in range(dv):
                out[t, h, c] = 0.0
            lse[t, h] = -np.inf
            continue
        tot = 0.0
        for s in range(nsplit):
            tot += math.exp(part_lse[s, t, h] - mx)
        for c in range(dv):
            out[t, h, c] = 0.0
        for s in range(nsplit):
            wgt = math.exp(part_lse[s, t, h] - mx) / tot
            if wgt > 0.0:
                for c in range(dv):
                    out[t, h, c] += wgt * part_out[s, t, h, c]
        lse[t, h] = mx + math.log(tot)


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
