"""Attention backward on the CPU (FlashAttention-2's recomputation), and the dropout forward.

Nothing of size seqlen_q x seqlen_k is allocated: scores are recomputed tile by tile from
the forward's ``lse`` (``p = exp(s - lse)``), with ``delta = rowsum(dout * out)``. Work is
split so that every parallel item owns what it writes (no atomics, no merge):

* ``tiled_dq``: items (query block, kv head) with the group's query rows in vector lanes
  (as the forward): ``S^T = K Q^T`` and ``dP^T = V dO^T`` by the QK micro-kernel, ``dS`` in
  vectors, ``dQ^T += K^T dS^T`` by the PV micro-kernel;
* ``tiled_dkdv``: items (key block, kv head) with keys in lanes, for each query head of
  the group (dk / dv summed over it, never a repeated K/V): ``S = Q K^T``, ``dP = dO V^T``
  (QK), ``dV^T += dO^T P`` and ``dK^T += Q^T dS`` (PV). The queries that see a key block
  are a contiguous range (``key_range`` is monotone in the query), found by bisection;
* ``bwd_dbias`` (only when dbias is asked for; plain loops): one item per row of the bias
  *as given* (broadcast axes folded), summing ``ds`` over every (b, h, i, j) that reads it.

The forward with dropout (``dropout_p > 0``) runs the unchanged fused forward for ``lse``,
then ``tiled_dropout_out`` recomputes ``p = exp(s - lse)`` and sums the kept values; so
``dropout_p = 0`` runs exactly the unchanged forward. ``dropout_forward`` (plain loops, a
two-pass softmax per (query, head)) is the simple twin, kept for tests.

Storage is contiguous (batched or packed varlen): key ``j`` of row ``b`` is storage row
``rows[b, 2] + j``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from .. import dropout as dr
from .. import masking
from .._modcache import ModKernel
from .._jit import inline, jit
from .atomics import fetch_add
from .forward import pv_mr, qk_mr, strip_block_kind
from .simd import block_rows, lanes, vexp, vload, vmul, vsplat, vstore, vsub, vtanh

key_range = inline(masking.key_range)
query_range = inline(masking.make_query_range(key_range))
tile_needs_mask = inline(masking.tile_needs_mask)
mix64 = inline(dr.mix64)
row_key = inline(dr.row_key)
element_bits = inline(dr.element_bits)


@inline
def dot(a, b, n):
    acc = a[0] * 0
    for c in range(n):
        acc += a[c] * b[c]
    return acc


@inline
def score(qrow, krow, d, i, j, b, h, off, scale, softcap, slope, has_alibi, bias, bstr,
          has_bias, smod, sargs):
    """(s, ds/ds_raw) of one visible pair: scale, score_mod, soft-cap, ALiBi, bias
    (DESIGN.md order; ds/ds_raw leaves out the score_mod's own derivative)."""
    s = dot(qrow, krow, d) * scale
    if smod is not None:
        s = smod(s, b, h, i, j, *sargs)
    dcap = scale / scale
    if softcap > 0.0:
        th = math.tanh(s / softcap)
        s = softcap * th
        dcap = dcap - th * th
    if has_alibi:
        s -= slope * abs(i + off - j)
    if has_bias:
        s += bias[b * bstr[0] + h * bstr[1] + i * bstr[2] + j * bstr[3]]
    return s, dcap


@inline
def masked(mask, mstr, has_mask, b, h, i, j):
    return has_mask and not mask[b * mstr[0] + h * mstr[1] + i * mstr[2] + j * mstr[3]]


@inline
def mod_masked(mmod, margs, b, h, i, j):
    """True where the user's mask_mod hides (i, j) (False without one: pruned)."""
    if mmod is None:
        return False
    return not mmod(b, h, i, j, *margs)


@jit(parallel=True)
def bwd_dbias(q, k, v, dout, lse, delta, dbias, bshape, rows, scale, causal, wl, wr, softcap,
              slopes, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, has_drop, seed,
              thr, pscale, smod, sargs, mmod, margs):
    """dbias (flat, canonical 4-D ``bshape``, zero-initialised): ds summed over every
    (b, h, i, j) that reads each element; one item per (b', h', i') row of the bias."""
    n_heads = q.shape[1]
    group = n_heads // k.shape[1]
    batch = rows.shape[0]
    one = scale / scale
    nb, nh, ni, nj = bshape[0], bshape[1], bshape[2], bshape[3]
    for w in prange(nb * nh * ni):
        bb = w // (nh * ni)
        hb = (w // ni) % nh
        ib = w % ni
        base = w * nj
        b0, b1 = (0, batch) if nb == 1 else (bb, bb + 1)
        h0, h1 = (0, n_heads) if nh == 1 else (hb, hb + 1)
        for b in range(b0, b1):
            q_start, lq, k_start, klen, off = rows[b, 0], rows[b, 1], rows[b, 2], \
                rows[b, 3], rows[b, 4]
            i0, i1 = (0, lq) if ni == 1 else (ib, min(ib + 1, lq))
            for h in range(h0, h1):
                kvh = h // group
                slope = one * 0
                if has_alibi:
                    slope = slopes[b if slopes.shape[0] > 1 else 0, h]
                for i in range(i0, i1):
                    t = q_start + i
                    lse_v = lse[t, h]
                    if lse_v == -np.inf:
                        continue
                    rkey = np.uint64(0)
                    if has_drop:
                        rkey = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
                    lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
                    for j in range(lo, hi):
                        if masked(mask, mstr, has_mask, b, h, i, j) or mod_masked(
                                mmod, margs, b, h, i, j):
                            continue
                        s, _dcap = score(q[t, h], k[k_start + j, kvh], q.shape[2], i, j, b, h,
                                        off, scale, softcap, slope, has_alibi, bias, bstr,
                                        has_bias, smod, sargs)
                        p = math.exp(s - lse_v)
                        dpd = dot(dout[t, h], v[k_start + j, kvh], v.shape[2])
                        if has_drop:
                            if element_bits(rkey, np.uint64(j)) < thr:
                                dpd = dpd * 0
                            else:
                                dpd = dpd * pscale
                        dbias[base + (j if nj > 1 else 0)] += p * (dpd - delta[t, h])


@jit
def kitem_costs(kitems, rows, causal, wl, wr, block_q):
    """Query tiles each key item (batch row, first key, end key) visits."""
    cost = np.empty(kitems.shape[0], np.int64)
    for it in range(kitems.shape[0]):
        b = kitems[it, 0]
        lq, k_start, klen, off = rows[b, 1], rows[b, 2], rows[b, 3], rows[b, 4]
        j0 = kitems[it, 1] - k_start
        j1 = kitems[it, 2] - k_start
        ilo = query_range(j0, lq, off, klen, causal, wl, wr)[0]
        ihi = query_range(j1 - 1, lq, off, klen, causal, wl, wr)[1]
        cost[it] = 1 + max(ihi - ilo, 0) // block_q
    return cost


# ---------------------------------------------------------------------------------------
# tiled kernels on the SIMD micro-kernels ("rows in lanes", as the forward)
# ---------------------------------------------------------------------------------------
@inline
def tile_fixup(st, n_o, nrs, lpos, lhead, o0, ohead, q_in_lanes, b, off, klen, causal, wl, wr,
               imax, jmax, slope_h, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask,
               positional, mmod, margs):
    """Masks, ALiBi and bias of an (outer, lanes) score tile, element (o, r) at ``o * nrs +
    r``. With ``q_in_lanes`` (the dq pass) lane ``r`` is query ``lpos[r]`` of head
    ``lhead[r]`` and outer ``o`` is key ``o0 + o``; otherwise (the dk/dv pass) lane ``r`` is
    key ``lpos[r]`` and outer ``o`` query ``o0 + o`` of head ``ohead``. Queries >= imax and
    keys >= jmax (padding) are invisible. Every per-element array is indexed by the lane
    only, so no scratch has to be as long as the outer tile."""
    ninf = -np.inf
    if not (has_alibi or has_bias or has_mask or mmod is not None):
        # positional only: touch just what is cut
        if q_in_lanes:  # each lane's keys [lo, hi): -inf before and after, along outer o
            for r in range(nrs):
                i = lpos[r]
                lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
                if i >= imax:
                    lo, hi = 0, 0
                a = min(max(lo - o0, 0), n_o)
                z = max(min(min(hi, jmax) - o0, n_o), a)
                for o in range(a):
                    st[o * nrs + r] = ninf
                for o in range(z, n_o):
                    st[o * nrs + r] = ninf
        else:
            for o in range(n_o):
                i = o0 + o
                lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
                if i >= imax:
                    lo, hi = 0, 0
                hi = min(hi, jmax)
                for r in range(nrs):
                    j = lpos[r]
                    if j < lo or j >= hi:
                        st[o * nrs + r] = ninf
        return
    if q_in_lanes:  # a query per lane: its key range once, then down the outer keys
        for r in range(nrs):
            i, h = lpos[r], lhead[r]
            lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
            if i >= imax:
                lo, hi = 0, 0
            hi = min(hi, jmax)
            for o in range(n_o):
                tile_element(st, o * nrs + r, i, o0 + o, h, lo, hi, b, off, slope_h,
                             has_alibi, bias, bstr, has_bias, mask, mstr, has_mask,
                             positional, mmod, margs)
    else:  # a query per outer row: its key range once, then across the key lanes
        for o in range(n_o):
            i = o0 + o
            lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
            if i >= imax:
                lo, hi = 0, 0
            hi = min(hi, jmax)
            for r in range(nrs):
                tile_element(st, o * nrs + r, i, lpos[r], ohead, lo, hi, b, off, slope_h,
                             has_alibi, bias, bstr, has_bias, mask, mstr, has_mask,
                             positional, mmod, margs)


@inline
def tile_element(st, x, i, j, h, lo, hi, b, off, slope_h, has_alibi, bias, bstr, has_bias,
                 mask, mstr, has_mask, positional, mmod, margs):
    """One score of a tile: -inf outside the query's key range [lo, hi) (when
    ``positional``), the mask or the mask_mod, else ALiBi and bias added."""
    if (positional and (j < lo or j >= hi)) or masked(mask, mstr, has_mask, b, h, i, j) or \
            mod_masked(mmod, margs, b, h, i, j):
        st[x] = -np.inf
        return
    if has_alibi:
        st[x] -= slope_h[h] * abs(i + off - j)
    if has_bias:
        st[x] += bias[b * bstr[0] + h * bstr[1] + i * bstr[2] + j * bstr[3]]


@inline
def tile_dropout(mb, n_o, nrs, rkey, lpos, o0, q_in_lanes, thr, pscale):
    """mb[o, r] = the dropout multiplier (0 or 1 / (1 - p)) of each element of a tile laid
    out as :func:`tile_fixup`'s: with ``q_in_lanes`` the row key of lane ``r`` is
    ``rkey[r]`` and its key ``o0 + o``; otherwise the row key is ``rkey[o]`` (the outer
    queries') and the key ``lpos[r]``."""
    zero = pscale * 0
    for o in range(n_o):
        for r in range(nrs):
            if q_in_lanes:
                keep = element_bits(rkey[r], np.uint64(o0 + o)) >= thr
            else:
                keep = element_bits(rkey[o], np.uint64(lpos[r])) >= thr
            mb[o * nrs + r] = pscale if keep else zero


@inline
def tile_mods(st, gm, n_o, nrs, lpos, lhead, o0, ohead, q_in_lanes, b, imax, jmax, smod,
              sgrad, sargs):
    """score_mod on a tile laid out as :func:`tile_fixup`'s (right after the scale), and
    gm = d(score_mod)/d(score) there when ``sgrad`` is given. Padding elements (queries
    >= imax, keys >= jmax) are left alone: the user's function never sees them."""
    for o in range(n_o):
        for r in range(nrs):
            x = o * nrs + r
            if q_in_lanes:
                i, j, h = lpos[r], o0 + o, lhead[r]
            else:
                i, j, h = o0 + o, lpos[r], ohead
            if i >= imax or j >= jmax:
                if sgrad is not None:
                    gm[x] = 0
                continue
            sv = st[x]
            if sgrad is not None:
                gm[x] = sgrad(sv, b, h, i, j, *sargs)
            st[x] = smod(sv, b, h, i, j, *sargs)


@inline
def keys_blocks_empty(bflags, bq, bk, b, h, i0, i1, j0, j1):
    """True when every block of the block mask that queries [i0, i1) of head ``h`` meet in
    keys [j0, j1) is empty (the dk/dv pass's strip-tile; the dq pass uses the forward's
    ``strip_block_kind``)."""
    bb = b if bflags.shape[0] > 1 else 0
    hb = h if bflags.shape[1] > 1 else 0
    for qb in range(i0 // bq, (i1 - 1) // bq + 1):
        for kb in range(j0 // bk, (j1 - 1) // bk + 1):
            if bflags[bb, hb, qb, kb] != 0:
                return False
    return True


@inline
def tile_softcap(st, dc, n, softcap):
    """st = softcap * tanh(st / softcap); dc = 1 - tanh^2 (its derivative), n elements."""
    w = lanes(st)
    one = softcap / softcap
    cap = vsplat(softcap)
    inv = vsplat(one / softcap)
    onev = vsplat(one)
    for u in range(0, n, w):
        t = vtanh(vmul(vload(st, u), inv))
        vstore(st, u, vmul(cap, t))
        vstore(dc, u, vsub(onev, vmul(t, t)))


@jit(parallel=True)
def tiled_dq(q, k, v, dout, lse, delta, dq, rows, items, scale, causal, wl, wr, softcap,
             slopes, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, has_drop, seed,
             thr, pscale, block_k, schedule, n_lanes, smod, sgrad, sargs, mmod, margs,
             bflags, bq, bk):
    """dq of work items (batch row, first query, end query) x kv head: rows (query, head of
    the group) in lanes, key tiles of ``block_k``; S^T = K (scale Q)^T and dP^T = V dO^T by
    the QK micro-kernel, dS in vectors, dQ^T += K^T dS^T by the PV micro-kernel."""
    dt = q.dtype
    n_heads, d = q.shape[1], q.shape[2]
    n_kv, dv = k.shape[1], v.shape[2]
    group = n_heads // n_kv
    w = lanes(q)
    nrs = 2 * w
    mr = block_rows(q)
    dpad = (d + mr - 1) // mr * mr
    nkt = (block_k + mr - 1) // mr * mr
    one = scale / scale
    n_items = items.shape[0]
    max_nq = 1
    for it in range(n_items):
        max_nq = max(max_nq, items[it, 2] - items[it, 1])
    max_nrp = (group * max_nq + nrs - 1) // nrs * nrs
    n_work = n_items * n_kv
    counter = np.zeros(1, np.int64)
    for lane in prange(n_lanes):
        # scratch of the lane, reused by its items (as the forward: fresh pages per
        # item cost page faults); items in ``schedule`` order (decreasing cost)
        # through an atomic counter, so the causal triangle balances over threads
        qt = np.zeros(d * max_nrp, dt)
        ot = np.zeros(dv * max_nrp, dt)
        dqt = np.zeros(dpad * max_nrp, dt)
        hh = np.empty(max_nrp, np.int64)
        qi = np.empty(max_nrp, np.int64)
        rlo = np.empty(max_nrp, np.int64)
        rhi = np.empty(max_nrp, np.int64)
        lr = np.empty(max_nrp, dt)
        de = np.empty(max_nrp, dt)
        slope_h = np.zeros(n_heads, dt)
        st = np.empty(nkt * nrs, dt)
        dpt = np.empty(nkt * nrs, dt)
        dc = np.empty(nkt * nrs, dt)
        mb = np.empty(nkt * nrs, dt)
        gm = np.empty(nkt * nrs if sgrad is not None else 1, dt)  # d score_mod / d score
        kb = np.empty(nkt, np.int64)
        vb = np.empty(nkt, np.int64)
        rk = np.zeros(max_nrp, np.uint64)  # dropout row key of each lane
        while True:
            idx = fetch_add(counter, 0, 1)
            if idx >= n_work:
                break
            wk = schedule[idx]
            it = wk // n_kv
            kvh = wk % n_kv
            b, i_first, i_end = items[it, 0], items[it, 1], items[it, 2]
            q_start, k_start, klen, off = rows[b, 0], rows[b, 2], rows[b, 3], rows[b, 4]
            i0 = i_first - q_start
            nq = i_end - i_first
            nr = group * nq
            nrp = (nr + nrs - 1) // nrs * nrs
            qt[:d * nrp] = 0
            ot[:dv * nrp] = 0
            dqt[:dpad * nrp] = 0
            if has_alibi:
                for h in range(n_heads):
                    slope_h[h] = slopes[b if slopes.shape[0] > 1 else 0, h]
            for r in range(nrp):
                rr = min(r, nr - 1)
                i = i0 + rr % nq
                h = kvh * group + rr // nq
                hh[r] = h
                qi[r] = i
                rlo[r], rhi[r] = key_range(i, i + 1, off, klen, causal, wl, wr)
                t = q_start + i
                if has_drop:
                    rk[r] = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
                lr[r] = lse[t, h] if lse[t, h] > -np.inf else np.inf  # exp(s - inf) = 0
                de[r] = delta[t, h]
                if r >= nr:
                    lr[r] = np.inf
                    continue
                for c in range(d):
                    qt[c * nrp + r] = q[t, h, c] * scale
                for c in range(dv):
                    ot[c * nrp + r] = dout[t, h, c]
            lo, hi = key_range(i0, i0 + nq, off, klen, causal, wl, wr)
            onev = vsplat(one)
            scv = vsplat(scale)
            for j0 in range(lo, hi, block_k):
                j1 = min(j0 + block_k, hi)
                nk = j1 - j0
                for u in range(nkt):
                    row = k_start + j0 + min(u, nk - 1)
                    kb[u] = (row * n_kv + kvh) * d
                    vb[u] = (row * n_kv + kvh) * dv
                for s0 in range(0, nrp, nrs):
                    slo = rlo[s0]
                    shi = rhi[s0]
                    for r in range(s0 + 1, s0 + nrs):
                        slo = min(slo, rlo[r])
                        shi = max(shi, rhi[r])
                    ne = min(j1, shi) - j0
                    if ne <= 0 or slo >= j1:
                        continue
                    if bflags is not None and strip_block_kind(
                            bflags, bq, bk, b, qi, hh, s0, nrs, j0, j0 + ne) == 0:
                        continue  # every block the strip meets is empty: as the forward
                    nep = (ne + mr - 1) // mr * mr
                    for u in range(0, nep, mr):
                        qk_mr(k, kb, u, qt, nrp, s0, d, st)
                        qk_mr(v, vb, u, ot, nrp, s0, dv, dpt)
                    if smod is not None:
                        tile_mods(st, gm, ne, nrs, qi[s0:], hh[s0:], j0, 0, True, b,
                                  rows[b, 1], klen, smod, sgrad, sargs)
                    if softcap > 0.0:
                        tile_softcap(st, dc, ne * nrs, softcap)
                    needs = slo > j0
                    for r in range(s0, s0 + nrs):
                        needs = needs or rlo[r] > j0 or rhi[r] < j0 + ne
                    if has_alibi or has_bias or has_mask or needs or mmod is not None:
                        tile_fixup(st, ne, nrs, qi[s0:], hh[s0:], j0, 0, True, b, off, klen,
                                   causal, wl, wr, rows[b, 1], klen, slope_h, has_alibi, bias,
                                   bstr, has_bias, mask, mstr, has_mask, needs, mmod, margs)
                    if has_drop:
                        tile_dropout(mb, ne, nrs, rk[s0:], qi, j0, True, thr, pscale)
                    l0 = vload(lr, s0)
                    l1 = vload(lr, s0 + w)
                    d0 = vload(de, s0)
                    d1 = vload(de, s0 + w)
                    for jj in range(ne):
                        for half in range(2):
                            x = jj * nrs + half * w
                            p = vexp(vsub(vload(st, x), l0 if half == 0 else l1))
                            dpv = vload(dpt, x)
                            if has_drop:
                                dpv = vmul(dpv, vload(mb, x))
                            ds = vmul(p, vsub(dpv, d0 if half == 0 else d1))
                            if softcap > 0.0:
                                ds = vmul(ds, vload(dc, x))
                            if sgrad is not None:
                                ds = vmul(ds, vload(gm, x))
                            vstore(st, x, vmul(ds, scv))
                    for c0 in range(0, dpad, mr):
                        pv_mr(k, kb, ne, st, dqt, nrp, s0, c0, d, onev, onev)
            for r in range(nr):
                t = q_start + qi[r]
                for c in range(d):
                    dq[t, hh[r], c] = dqt[c * nrp + r]


@jit(parallel=True)
def tiled_dkdv(q, k, v, dout, lse, delta, dk, dv_out, rows, kitems, scale, causal, wl, wr,
               softcap, slopes, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, has_drop,
               seed, thr, pscale, block_q, schedule, n_lanes, smod, sgrad, sargs, mmod,
               margs, bflags, bq, bk):
    """dk / dv of work items (batch row, first key, end key) x kv head: keys in lanes, query
    tiles of ``block_q`` for each query head of the group; S = Q (scale K)^T and
    dP = dO V^T by the QK micro-kernel, dV^T += dO^T P and dK^T += Q^T dS by the PV one."""
    dt = q.dtype
    n_heads, d = q.shape[1], q.shape[2]
    n_kv, dv = k.shape[1], v.shape[2]
    group = n_heads // n_kv
    w = lanes(q)
    nrs = 2 * w
    mr = block_rows(q)
    dpad = (d + mr - 1) // mr * mr
    dvpad = (dv + mr - 1) // mr * mr
    nqt = (block_q + mr - 1) // mr * mr
    one = scale / scale
    n_items = kitems.shape[0]
    max_nk = 1
    for it in range(n_items):
        max_nk = max(max_nk, kitems[it, 2] - kitems[it, 1])
    max_nrp = (max_nk + nrs - 1) // nrs * nrs
    n_work = n_items * n_kv
    counter = np.zeros(1, np.int64)
    for lane in prange(n_lanes):
        # scratch of the lane, reused by its items (as the forward: fresh pages per
        # item cost page faults); items in ``schedule`` order (decreasing cost)
        # through an atomic counter, so the causal triangle balances over threads
        kt = np.zeros(d * max_nrp, dt)
        vt = np.zeros(dv * max_nrp, dt)
        dkt = np.zeros(dpad * max_nrp, dt)
        dvt = np.zeros(dvpad * max_nrp, dt)
        lj = np.empty(max_nrp, np.int64)
        slope_h = np.zeros(n_heads, dt)
        st = np.empty(nqt * nrs, dt)
        dpt = np.empty(nqt * nrs, dt)
        dc = np.empty(nqt * nrs, dt)
        mb = np.empty(nqt * nrs, dt)
        gm = np.empty(nqt * nrs if sgrad is not None else 1, dt)  # d score_mod / d score
        pb = np.empty(nqt * nrs, dt)
        qb = np.empty(nqt, np.int64)
        ob = np.empty(nqt, np.int64)
        lrow = np.empty(nqt, dt)
        drow = np.empty(nqt, dt)
        okey = np.zeros(nqt, np.uint64)  # dropout row key of each query of a tile
        while True:
            idx = fetch_add(counter, 0, 1)
            if idx >= n_work:
                break
            wk = schedule[idx]
            it = wk // n_kv
            kvh = wk % n_kv
            b, r_first, r_end = kitems[it, 0], kitems[it, 1], kitems[it, 2]
            q_start, lq, k_start, klen, off = rows[b, 0], rows[b, 1], rows[b, 2], rows[b, 3], \
                rows[b, 4]
            kj0 = r_first - k_start
            nk = r_end - r_first
            nrp = (nk + nrs - 1) // nrs * nrs
            kt[:d * nrp] = 0
            vt[:dv * nrp] = 0
            dkt[:dpad * nrp] = 0
            dvt[:dvpad * nrp] = 0
            if has_alibi:
                for h in range(n_heads):
                    slope_h[h] = slopes[b if slopes.shape[0] > 1 else 0, h]
            for r in range(nrp):
                lj[r] = kj0 + r
                if r < nk:
                    row = r_first + r
                    for c in range(d):
                        kt[c * nrp + r] = k[row, kvh, c] * scale
                    for c in range(dv):
                        vt[c * nrp + r] = v[row, kvh, c]
            ilo = query_range(kj0, lq, off, klen, causal, wl, wr)[0]
            ihi = query_range(kj0 + nk - 1, lq, off, klen, causal, wl, wr)[1]
            onev = vsplat(one)
            scv = vsplat(scale)
            for h in range(kvh * group, kvh * group + group):
                for i0 in range(ilo, ihi, block_q):
                    i1 = min(i0 + block_q, ihi)
                    ni = i1 - i0
                    for u in range(nqt):
                        t = q_start + i0 + min(u, ni - 1)
                        qb[u] = (t * n_heads + h) * d
                        ob[u] = (t * n_heads + h) * dv
                        lrow[u] = lse[t, h] if lse[t, h] > -np.inf else np.inf
                        drow[u] = delta[t, h]
                        if has_drop:
                            okey[u] = row_key(seed, np.uint64(b), np.uint64(h),
                                              np.uint64(t - q_start))
                    nip = (ni + mr - 1) // mr * mr
                    for s0 in range(0, nrp, nrs):
                        sj0 = kj0 + s0
                        sj1 = min(kj0 + nk, sj0 + nrs)
                        if sj0 >= sj1:
                            continue
                        if bflags is not None and keys_blocks_empty(bflags, bq, bk, b, h, i0,
                                                                    i1, sj0, sj1):
                            continue
                        for u in range(0, nip, mr):
                            qk_mr(q, qb, u, kt, nrp, s0, d, st)
                            qk_mr(dout, ob, u, vt, nrp, s0, dv, dpt)
                        if smod is not None:
                            tile_mods(st, gm, ni, nrs, lj[s0:], lj, i0, h, False, b, lq,
                                      kj0 + nk, smod, sgrad, sargs)
                        if softcap > 0.0:
                            tile_softcap(st, dc, ni * nrs, softcap)
                        needs = sj1 - sj0 < nrs or tile_needs_mask(i0, i1, sj0, sj1, off, causal,
                                                                   wl, wr)
                        if has_alibi or has_bias or has_mask or needs or mmod is not None:
                            tile_fixup(st, ni, nrs, lj[s0:], lj, i0, h, False, b, off, klen,
                                       causal, wl, wr, lq, kj0 + nk, slope_h, has_alibi, bias,
                                       bstr, has_bias, mask, mstr, has_mask, needs, mmod, margs)
                        if has_drop:
                            tile_dropout(mb, ni, nrs, okey, lj[s0:], i0, False, thr, pscale)
                        for ii in range(ni):
                            lvec = vsplat(lrow[ii])
                            dvec = vsplat(drow[ii])
                            for half in range(2):
                                x = ii * nrs + half * w
                                p = vexp(vsub(vload(st, x), lvec))
                                dpv = vload(dpt, x)
                                if has_drop:
                                    m = vload(mb, x)
                                    dpv = vmul(dpv, m)
                                    vstore(pb, x, vmul(p, m))
                                else:
                                    vstore(pb, x, p)
                                ds = vmul(p, vsub(dpv, dvec))
                                if softcap > 0.0:
                                    ds = vmul(ds, vload(dc, x))
                                if sgrad is not None:
                                    ds = vmul(ds, vload(gm, x))
                                vstore(st, x, vmul(ds, scv))
                        for c0 in range(0, dvpad, mr):
                            pv_mr(dout, ob, ni, pb, dvt, nrp, s0, c0, dv, onev, onev)
                        for c0 in range(0, dpad, mr):
                            pv_mr(q, qb, ni, st, dkt, nrp, s0, c0, d, onev, onev)
            for r in range(nk):
                row = r_first + r
                for c in range(d):
                    dk[row, kvh, c] = dkt[c * nrp + r]
                for c in range(dv):
                    dv_out[row, kvh, c] = dvt[c * nrp + r]


@jit(parallel=True)
def tiled_dropout_out(q, k, v, lse, out, rows, items, scale, causal, wl, wr, softcap, slopes,
                      has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, seed, thr, pscale,
                      block_k, schedule, n_lanes, smod, sargs, mmod, margs, bflags, bq, bk):
    """The dropout forward's output from the forward's ``lse``: ``out_i = sum_j exp(s_ij -
    lse_i) keep_ij / (1 - p) v_j``, tiled as ``tiled_dq`` (S^T by the QK micro-kernel, O^T
    += V^T P by the PV one)."""
    dt = q.dtype
    n_heads, d = q.shape[1], q.shape[2]
    n_kv, dv = k.shape[1], v.shape[2]
    group = n_heads // n_kv
    w = lanes(q)
    nrs = 2 * w
    mr = block_rows(q)
    dvpad = (dv + mr - 1) // mr * mr
    nkt = (block_k + mr - 1) // mr * mr
    one = scale / scale
    n_items = items.shape[0]
    max_nq = 1
    for it in range(n_items):
        max_nq = max(max_nq, items[it, 2] - items[it, 1])
    max_nrp = (group * max_nq + nrs - 1) // nrs * nrs
    n_work = n_items * n_kv
    counter = np.zeros(1, np.int64)
    for lane in prange(n_lanes):
        # scratch of the lane, reused by its items (as the forward: fresh pages per
        # item cost page faults); items in ``schedule`` order (decreasing cost)
        # through an atomic counter, so the causal triangle balances over threads
        qt = np.zeros(d * max_nrp, dt)
        ot = np.zeros(dvpad * max_nrp, dt)
        hh = np.empty(max_nrp, np.int64)
        qi = np.empty(max_nrp, np.int64)
        rlo = np.empty(max_nrp, np.int64)
        rhi = np.empty(max_nrp, np.int64)
        lr = np.empty(max_nrp, dt)
        slope_h = np.zeros(n_heads, dt)
        st = np.empty(nkt * nrs, dt)
        mb = np.empty(nkt * nrs, dt)
        kb = np.empty(nkt, np.int64)
        vb = np.empty(nkt, np.int64)
        rk = np.zeros(max_nrp, np.uint64)  # dropout row key of each lane
        while True:
            idx = fetch_add(counter, 0, 1)
            if idx >= n_work:
                break
            wk = schedule[idx]
            it = wk // n_kv
            kvh = wk % n_kv
            b, i_first, i_end = items[it, 0], items[it, 1], items[it, 2]
            q_start, k_start, klen, off = rows[b, 0], rows[b, 2], rows[b, 3], rows[b, 4]
            i0 = i_first - q_start
            nq = i_end - i_first
            nr = group * nq
            nrp = (nr + nrs - 1) // nrs * nrs
            qt[:d * nrp] = 0
            ot[:dvpad * nrp] = 0
            if has_alibi:
                for h in range(n_heads):
                    slope_h[h] = slopes[b if slopes.shape[0] > 1 else 0, h]
            for r in range(nrp):
                rr = min(r, nr - 1)
                i = i0 + rr % nq
                h = kvh * group + rr // nq
                hh[r] = h
                qi[r] = i
                rlo[r], rhi[r] = key_range(i, i + 1, off, klen, causal, wl, wr)
                t = q_start + i
                rk[r] = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
                lr[r] = lse[t, h] if lse[t, h] > -np.inf else np.inf
                if r >= nr:
                    lr[r] = np.inf
                    continue
                for c in range(d):
                    qt[c * nrp + r] = q[t, h, c] * scale
            lo, hi = key_range(i0, i0 + nq, off, klen, causal, wl, wr)
            for j0 in range(lo, hi, block_k):
                j1 = min(j0 + block_k, hi)
                nk = j1 - j0
                for u in range(nkt):
                    row = k_start + j0 + min(u, nk - 1)
                    kb[u] = (row * n_kv + kvh) * d
                    vb[u] = (row * n_kv + kvh) * dv
                for s0 in range(0, nrp, nrs):
                    slo = rlo[s0]
                    shi = rhi[s0]
                    for r in range(s0 + 1, s0 + nrs):
                        slo = min(slo, rlo[r])
                        shi = max(shi, rhi[r])
                    ne = min(j1, shi) - j0
                    if ne <= 0 or slo >= j1:
                        continue
                    if bflags is not None and strip_block_kind(
                            bflags, bq, bk, b, qi, hh, s0, nrs, j0, j0 + ne) == 0:
                        continue  # every block the strip meets is empty: as the forward
                    nep = (ne + mr - 1) // mr * mr
                    for u in range(0, nep, mr):
                        qk_mr(k, kb, u, qt, nrp, s0, d, st)
                    if smod is not None:
                        tile_mods(st, mb, ne, nrs, qi[s0:], hh[s0:], j0, 0, True, b,
                                  rows[b, 1], klen, smod, None, sargs)
                    if softcap > 0.0:
                        tile_softcap(st, mb, ne * nrs, softcap)
                    needs = slo > j0
                    for r in range(s0, s0 + nrs):
                        needs = needs or rlo[r] > j0 or rhi[r] < j0 + ne
                    if has_alibi or has_bias or has_mask or needs or mmod is not None:
                        tile_fixup(st, ne, nrs, qi[s0:], hh[s0:], j0, 0, True, b, off, klen,
                                   causal, wl, wr, rows[b, 1], klen, slope_h, has_alibi, bias,
                                   bstr, has_bias, mask, mstr, has_mask, needs, mmod, margs)
                    tile_dropout(mb, ne, nrs, rk[s0:], qi, j0, True, thr, pscale)
                    l0 = vload(lr, s0)
                    l1 = vload(lr, s0 + w)
                    for jj in range(ne):
                        x = jj * nrs
                        vstore(st, x, vmul(vexp(vsub(vload(st, x), l0)), vload(mb, x)))
                        vstore(st, x + w, vmul(vexp(vsub(vload(st, x + w), l1)), vload(mb, x + w)))
                    onev = vsplat(one)
                    for c0 in range(0, dvpad, mr):
                        pv_mr(v, vb, ne, st, ot, nrp, s0, c0, dv, onev, onev)
            for r in range(nr):
                t = q_start + qi[r]
                for c in range(dv):
                    out[t, hh[r], c] = ot[c * nrp + r]


# the same kernels for calls with user mods (numba_attn.mods): one variant per mod written to
# a real file and cached on disk (numba_attn._modcache, as the forward's flash_forward_mods)
_MODDED = {"dq": ModKernel(tiled_dq), "dkdv": ModKernel(tiled_dkdv),
           "dbias": ModKernel(bwd_dbias), "dropout": ModKernel(tiled_dropout_out)}
