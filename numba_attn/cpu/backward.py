"""Attention backward on the CPU (FlashAttention-2's recomputation), and the dropout forward.

Nothing of size seqlen_q x seqlen_k is allocated: scores are recomputed pair by pair from
the forward's ``lse`` (``p = exp(s - lse)``), with ``delta = rowsum(dout * out)``. Work is
split so that every parallel item owns what it writes (no atomics, no merge):

* ``bwd_dq``: one item per (query, head): ``dq = scale * sum_j ds_ij k_j``;
* ``bwd_dkdv``: one item per (key, kv head): ``dv = sum p_ij dout_i`` and
  ``dk = scale * sum ds_ij q_i`` over the query heads of the kv head's GQA group (never a
  repeated K/V); the queries that see key ``j`` are a contiguous range (``key_range`` is
  monotone in the query), found by bisection;
* ``bwd_dbias`` (only when dbias is asked for): one item per row of the bias *as given*
  (broadcast axes folded), which sums ``ds`` over every (b, h, i, j) that reads it.

``dropout_forward`` is the forward with dropout (``dropout_p > 0``): a plain two-pass
softmax per (query, head) on the same score recomputation, kept apart from the fused
forward kernel so that ``dropout_p = 0`` runs exactly the unchanged forward.

Storage is contiguous (batched or packed varlen): key ``j`` of row ``b`` is storage row
``rows[b, 2] + j``. Dot products are plain loops (``fastmath`` reassociation lets LLVM
vectorise them).
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from .. import dropout as dr
from .. import masking
from .._jit import inline, jit

key_range = inline(masking.key_range)
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
          has_bias):
    """(s, ds/ds_raw) of one visible pair: scale, soft-cap, ALiBi, bias (DESIGN.md order)."""
    s = dot(qrow, krow, d) * scale
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
def pair_grad(q, k, v, dout, t, h, row, kvh, i, j, b, off, scale, softcap, slope, has_alibi,
              bias, bstr, has_bias, lse_v, delta_v, has_drop, rkey, thr, pscale):
    """(p * keep / (1 - p_drop), ds * dcap * scale) of a visible pair (query t, head h, key
    storage row ``row``)."""
    d, dv = q.shape[2], v.shape[2]
    s, dcap = score(q[t, h], k[row, kvh], d, i, j, b, h, off, scale, softcap, slope,
                    has_alibi, bias, bstr, has_bias)
    p = math.exp(s - lse_v)
    dpd = dot(dout[t, h], v[row, kvh], dv)
    mult = scale / scale
    if has_drop:
        if element_bits(rkey, np.uint64(j)) < thr:
            mult = mult * 0
        else:
            mult = pscale
    ds = p * (dpd * mult - delta_v)
    return p * mult, ds * dcap * scale


@inline
def row_setup(rows, tb, t, slopes, has_alibi, h, dt_one):
    b = tb[t]
    i = t - rows[b, 0]
    slope = dt_one * 0
    if has_alibi:
        slope = slopes[b if slopes.shape[0] > 1 else 0, h]
    return b, i, rows[b, 2], rows[b, 3], rows[b, 4], slope


@jit(parallel=True)
def bwd_dq(q, k, v, dout, lse, delta, dq, rows, tb, scale, causal, wl, wr, softcap, slopes,
           has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, has_drop, seed, thr, pscale):
    """dq (Tq, H, D); tb (Tq,) batch row of each query token."""
    tq, n_heads, d = q.shape
    group = n_heads // k.shape[1]
    one = scale / scale
    for w in prange(tq * n_heads):
        t = w // n_heads
        h = w % n_heads
        kvh = h // group
        acc = np.zeros(d, q.dtype)
        lse_v = lse[t, h]
        if tb[t] < 0:
            lse_v = -np.inf * one
        b, i, k_start, klen, off, slope = row_setup(rows, tb, t, slopes, has_alibi, h, one)
        if lse_v > -np.inf:
            rkey = np.uint64(0)
            if has_drop:
                rkey = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
            lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
            for j in range(lo, hi):
                if masked(mask, mstr, has_mask, b, h, i, j):
                    continue
                row = k_start + j
                _, dsr = pair_grad(q, k, v, dout, t, h, row, kvh, i, j, b, off, scale,
                                   softcap, slope, has_alibi, bias, bstr, has_bias, lse_v,
                                   delta[t, h], has_drop, rkey, thr, pscale)
                krow = k[row, kvh]
                for c in range(d):
                    acc[c] += dsr * krow[c]
        for c in range(d):
            dq[t, h, c] = acc[c]


@inline
def query_range(j, lq, off, klen, causal, wl, wr):
    """Queries [ilo, ihi) of a row (``lq`` queries) whose key range holds key ``j``."""
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


@jit(parallel=True)
def bwd_dkdv(q, k, v, dout, lse, delta, dk, dv_out, rows, kb, scale, causal, wl, wr, softcap,
             slopes, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, has_drop, seed,
             thr, pscale):
    """dk (N, Hkv, D), dv (N, Hkv, Dv) (zero-initialised); kb (N,) batch row of each
    storage key row (-1: none)."""
    n_heads, d = q.shape[1], q.shape[2]
    n, n_kv, dv = k.shape[0], k.shape[1], v.shape[2]
    group = n_heads // n_kv
    one = scale / scale
    for w in prange(n * n_kv):
        row = w // n_kv
        kvh = w % n_kv
        b = kb[row]
        if b < 0:
            continue
        q_start, lq, k_start, klen, off = rows[b, 0], rows[b, 1], rows[b, 2], rows[b, 3], \
            rows[b, 4]
        j = row - k_start
        if j >= klen:
            continue
        ilo, ihi = query_range(j, lq, off, klen, causal, wl, wr)
        if ilo >= ihi:
            continue
        acck = np.zeros(d, q.dtype)
        accv = np.zeros(dv, q.dtype)
        for h in range(kvh * group, kvh * group + group):
            slope = one * 0
            if has_alibi:
                slope = slopes[b if slopes.shape[0] > 1 else 0, h]
            for i in range(ilo, ihi):
                t = q_start + i
                lse_v = lse[t, h]
                if lse_v == -np.inf or masked(mask, mstr, has_mask, b, h, i, j):
                    continue
                rkey = np.uint64(0)
                if has_drop:
                    rkey = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
                pd, dsr = pair_grad(q, k, v, dout, t, h, row, kvh, i, j, b, off, scale,
                                    softcap, slope, has_alibi, bias, bstr, has_bias, lse_v,
                                    delta[t, h], has_drop, rkey, thr, pscale)
                qrow = q[t, h]
                orow = dout[t, h]
                for c in range(d):
                    acck[c] += dsr * qrow[c]
                for c in range(dv):
                    accv[c] += pd * orow[c]
        for c in range(d):
            dk[row, kvh, c] = acck[c]
        for c in range(dv):
            dv_out[row, kvh, c] = accv[c]


@jit(parallel=True)
def bwd_dbias(q, k, v, dout, lse, delta, dbias, bshape, rows, scale, causal, wl, wr, softcap,
              slopes, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, has_drop, seed,
              thr, pscale):
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
                        if masked(mask, mstr, has_mask, b, h, i, j):
                            continue
                        s, dcap = score(q[t, h], k[k_start + j, kvh], q.shape[2], i, j, b, h,
                                        off, scale, softcap, slope, has_alibi, bias, bstr,
                                        has_bias)
                        p = math.exp(s - lse_v)
                        dpd = dot(dout[t, h], v[k_start + j, kvh], v.shape[2])
                        if has_drop:
                            if element_bits(rkey, np.uint64(j)) < thr:
                                dpd = dpd * 0
                            else:
                                dpd = dpd * pscale
                        dbias[base + (j if nj > 1 else 0)] += p * (dpd - delta[t, h])


@jit(parallel=True)
def dropout_forward(q, k, v, out, lse, rows, tb, scale, causal, wl, wr, softcap, slopes,
                    has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, sinks, has_sinks,
                    seed, thr, pscale):
    """Forward with dropout: out (Tq, H, Dv), lse (Tq, H) (lse of the undropped softmax)."""
    tq, n_heads, d = q.shape
    group = n_heads // k.shape[1]
    dv = v.shape[2]
    one = scale / scale
    for w in prange(tq * n_heads):
        t = w // n_heads
        h = w % n_heads
        kvh = h // group
        if tb[t] < 0:  # a padding query (q_lens): left as zero / -inf
            continue
        b, i, k_start, klen, off, slope = row_setup(rows, tb, t, slopes, has_alibi, h, one)
        lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
        n = max(hi - lo, 0)
        st = np.empty(n, q.dtype)
        m = -np.inf * one
        if has_sinks:
            m = sinks[h]
        for jj in range(n):
            j = lo + jj
            if masked(mask, mstr, has_mask, b, h, i, j):
                st[jj] = -np.inf
                continue
            s, _ = score(q[t, h], k[k_start + j, kvh], d, i, j, b, h, off, scale, softcap,
                         slope, has_alibi, bias, bstr, has_bias)
            st[jj] = s
            m = max(m, s)
        acc = np.zeros(dv, q.dtype)
        if m == -np.inf:
            lse[t, h] = -np.inf
        else:
            l = one * 0
            if has_sinks:
                l = math.exp(sinks[h] - m)
            rkey = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
            for jj in range(n):
                p = math.exp(st[jj] - m)
                l += p
                if p > 0.0 and element_bits(rkey, np.uint64(lo + jj)) >= thr:
                    vrow = v[k_start + lo + jj, kvh]
                    for c in range(dv):
                        acc[c] += p * vrow[c]
            lse[t, h] = m + math.log(l)
            inv = pscale / l
            for c in range(dv):
                acc[c] *= inv
        for c in range(dv):
            out[t, h, c] = acc[c]


# ---------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------
def _dummy(dtype, ndim=1):
    return np.zeros((1,) * ndim, dtype=dtype)


def _token_rows(rows, n, start_col, len_col):
    """(n,) int64: batch row of each storage row (-1 where none)."""
    out = np.full(n, -1, np.int64)
    for b in range(rows.shape[0]):
        s0, ln = int(rows[b, start_col]), int(rows[b, len_col])
        out[s0:s0 + max(ln, 0)] = b
    return out


def _common(p, drop_p, seed):
    """Option arguments shared by the kernels (after scale .. mask strides)."""
    from ..masking import CAUSAL_CODES

    cfg = p.config
    dt = p.compute_dtype
    return (dt.type(cfg.scale), np.int64(CAUSAL_CODES[cfg.causal]), np.int64(cfg.window[0]),
            np.int64(cfg.window[1]), dt.type(cfg.softcap),
            p.slopes if p.slopes is not None else _dummy(dt, 2), p.slopes is not None,
            p.bias if p.bias is not None else _dummy(dt),
            p.bias_strides if p.bias is not None else _dummy(np.int64), p.bias is not None,
            p.mask if p.mask is not None else _dummy(np.bool_),
            p.mask_strides if p.mask is not None else _dummy(np.int64), p.mask is not None)


def _drop_args(p, drop_p, seed):
    dt = p.compute_dtype
    return (np.uint64(seed), np.uint64(dr.threshold(drop_p)),
            dt.type(1.0 / (1.0 - drop_p)))


def forward_dropout(p, drop_p, seed):
    """Forward with dropout of a contiguous dispatch.Problem: out (Tq, H, Dv), lse (Tq, H)."""
    from .._jit import parallel_guard

    cfg = p.config
    dt = p.compute_dtype
    tq = p.q.shape[0]
    out = p.extra.get("out_buffer")  # (Tq, H, Dv) in the compute dtype, written in place
    if out is None:
        out = np.empty((tq, cfg.num_heads, cfg.head_dim_v), dt)
    out[...] = 0
    lse = np.full((tq, cfg.num_heads), -np.inf, dt)
    if tq == 0:
        return out, lse
    tb = _token_rows(p.rows, tq, 0, 1)
    sinks = p.sinks if p.sinks is not None else _dummy(dt)
    with parallel_guard():
        dropout_forward(p.q, p.k, p.v, out, lse, p.rows, tb, *_common(p, drop_p, seed), sinks,
                        p.sinks is not None, *_drop_args(p, drop_p, seed))
    return out, lse


def backward(p, dout, out, lse, drop_p=0.0, seed=0, bias_shape=None):
    """Gradients of a contiguous dispatch.Problem.

    dout / out (Tq, H, Dv) and lse (Tq, H) in the compute dtype. Returns dq, dk, dv (the
    packed shapes of q, k, v), dbias (``bias_shape``, canonical 4-D) when ``bias_shape`` is
    given, else None, and dsinks (H,) or None.
    """
    from .._jit import parallel_guard

    dt = p.compute_dtype
    q, k, v = p.q, p.k, p.v
    dq = np.zeros(q.shape, dt)
    dk = np.zeros(k.shape, dt)
    dv = np.zeros(v.shape, dt)
    delta = np.einsum("thc,thc->th", dout, out).astype(dt)
    tb = _token_rows(p.rows, q.shape[0], 0, 1)
    kb = _token_rows(p.rows, k.shape[0], 2, 3)
    common = _common(p, drop_p, seed)
    drop = (drop_p > 0.0,) + _drop_args(p, drop_p, seed)
    dbias = None
    with parallel_guard():
        if q.shape[0]:
            bwd_dq(q, k, v, dout, lse, delta, dq, p.rows, tb, *common, *drop)
        if k.shape[0]:
            bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, p.rows, kb, *common, *drop)
        if bias_shape is not None:
            dbias = np.zeros(int(np.prod(bias_shape)), dt)
            if q.shape[0] and k.shape[0]:
                bwd_dbias(q, k, v, dout, lse, delta, dbias, np.asarray(bias_shape, np.int64),
                          p.rows, *common, *drop)
            dbias = dbias.reshape(bias_shape)
    dsinks = None
    if p.sinks is not None:
        fin = np.isfinite(lse)
        w = np.where(fin, np.exp(np.where(fin, p.sinks[None, :] - lse, 0.0)), 0.0)
        dsinks = -(w * delta).sum(axis=0).astype(dt)
    return dq, dk, dv, dbias, dsinks
