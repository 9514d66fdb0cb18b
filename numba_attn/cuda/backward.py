"""Attention backward and the dropout forward on the GPU (``@cuda.jit``), twins of
``cpu/backward.py`` in their simplest form: one thread per output row, nothing shared.

* ``dq_kernel``: a thread per (query, head) sums ``ds_ij k_j`` over its visible keys;
* ``dkdv_kernel``: a thread per (key, kv head) sums over the queries of every query head
  of its GQA group that see the key (a contiguous range, found by bisection);
* ``dbias_kernel``: a thread per row of the bias as given (broadcast axes folded);
* ``dropout_forward_kernel``: a thread per (query, head), two passes over its keys.

Scores are recomputed from ``lse`` as on the CPU (FlashAttention-2); the dropout keep bit
is the counter-based one of :mod:`numba_attn.dropout`, bit for bit. These kernels favour
being obviously right over speed (no shared-memory tiling yet).
"""
from __future__ import annotations

import math

import numpy as np
from numba import config as numba_config
from numba import cuda

from .. import dropout as dr
from .. import masking

key_range = cuda.jit(device=True, inline=True)(masking.key_range)
query_range = cuda.jit(device=True, inline=True)(masking.make_query_range(key_range))
mix64 = cuda.jit(device=True, inline=True)(dr.mix64)
_G = dr.GOLDEN
_ONE = np.uint64(1)
_S32 = np.uint64(32)


if not numba_config.ENABLE_CUDASIM:
    @cuda.jit(device=True, inline=True)
    def row_key(seed, b, h, i):
        """dropout.row_key (the same formula on uint64)."""
        z = mix64(seed + _G * (b + _ONE))
        z = mix64(z + _G * (h + _ONE))
        return mix64(z + _G * (i + _ONE))

    @cuda.jit(device=True, inline=True)
    def keep_bit(key, j, thr):
        return (mix64(key + _G * (np.uint64(j) + _ONE)) >> _S32) >= thr
else:  # the simulator runs Python on numpy uint64 scalars, which warn when they wrap
    @cuda.jit(device=True)
    def row_key(seed, b, h, i):
        with np.errstate(over="ignore"):
            return dr.row_key(np.uint64(seed), np.uint64(b), np.uint64(h), np.uint64(i))

    @cuda.jit(device=True)
    def keep_bit(key, j, thr):
        with np.errstate(over="ignore"):
            return dr.element_bits(np.uint64(key), np.uint64(j)) >= thr


@cuda.jit(device=True, inline=True)
def score(q, k, t, h, row, kvh, i, j, b, off, scale, softcap, slope, has_alibi, bias, bstr,
          has_bias):
    """(s, ds/ds_raw) of a visible pair, in DESIGN.md's order."""
    acc = 0.0
    for c in range(q.shape[2]):
        acc += q[t, h, c] * k[row, kvh, c]
    s = acc * scale
    dcap = 1.0
    if softcap > 0.0:
        th = math.tanh(s / softcap)
        s = softcap * th
        dcap = 1.0 - th * th
    if has_alibi:
        s -= slope * abs(i + off - j)
    if has_bias:
        s += bias[b * bstr[0] + h * bstr[1] + i * bstr[2] + j * bstr[3]]
    return s, dcap


@cuda.jit(device=True, inline=True)
def masked(mask, mstr, has_mask, b, h, i, j):
    return has_mask and not mask[b * mstr[0] + h * mstr[1] + i * mstr[2] + j * mstr[3]]


@cuda.jit(device=True, inline=True)
def pair(q, k, v, dout, t, h, row, kvh, i, j, b, off, scale, softcap, slope, has_alibi, bias,
         bstr, has_bias, lse_v, delta_v, has_drop, rkey, thr, pscale):
    """(p * dropout multiplier, ds * dcap * scale, ds) of a visible pair."""
    s, dcap = score(q, k, t, h, row, kvh, i, j, b, off, scale, softcap, slope, has_alibi,
                    bias, bstr, has_bias)
    p = math.exp(s - lse_v)
    dpd = 0.0
    for c in range(v.shape[2]):
        dpd += dout[t, h, c] * v[row, kvh, c]
    mult = 1.0
    if has_drop:
        mult = pscale if keep_bit(rkey, j, thr) else 0.0
    ds = p * (dpd * mult - delta_v)
    return p * mult, ds * dcap * scale, ds


@cuda.jit(device=True, inline=True)
def slope_of(slopes, has_alibi, b, h):
    if has_alibi:
        return slopes[b if slopes.shape[0] > 1 else 0, h]
    return 0.0


@cuda.jit
def delta_kernel(dout, out, delta):
    """delta[t, h] = sum_c dout[t, h, c] out[t, h, c]."""
    w = cuda.grid(1)
    n_heads = dout.shape[1]
    if w >= dout.shape[0] * n_heads:
        return
    t, h = w // n_heads, w % n_heads
    acc = 0.0
    for c in range(dout.shape[2]):
        acc += dout[t, h, c] * out[t, h, c]
    delta[t, h] = acc


@cuda.jit
def dq_kernel(q, k, v, dout, lse, delta, dq, rows, tb, scale, causal, wl, wr, softcap, slopes,
              has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, has_drop, seed, thr,
              pscale):
    w = cuda.grid(1)
    tq, n_heads, d = q.shape
    if w >= tq * n_heads:
        return
    t, h = w // n_heads, w % n_heads
    kvh = h // (n_heads // k.shape[1])
    for c in range(d):
        dq[t, h, c] = 0.0
    b = tb[t]
    lse_v = lse[t, h]
    if b < 0 or lse_v == -math.inf:
        return
    i = t - rows[b, 0]
    k_start, klen, off = rows[b, 2], rows[b, 3], rows[b, 4]
    slope = slope_of(slopes, has_alibi, b, h)
    rkey = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
    lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
    for j in range(lo, hi):
        if masked(mask, mstr, has_mask, b, h, i, j):
            continue
        row = k_start + j
        _, dsr, _ = pair(q, k, v, dout, t, h, row, kvh, i, j, b, off, scale, softcap, slope,
                         has_alibi, bias, bstr, has_bias, lse_v, delta[t, h], has_drop, rkey,
                         thr, pscale)
        for c in range(d):
            dq[t, h, c] += dsr * k[row, kvh, c]


@cuda.jit
def dkdv_kernel(q, k, v, dout, lse, delta, dk, dv, rows, kb, scale, causal, wl, wr, softcap,
                slopes, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask, has_drop, seed,
                thr, pscale):
    w = cuda.grid(1)
    n, n_kv = k.shape[0], k.shape[1]
    if w >= n * n_kv:
        return
    row, kvh = w // n_kv, w % n_kv
    n_heads = q.shape[1]
    group = n_heads // n_kv
    for c in range(k.shape[2]):
        dk[row, kvh, c] = 0.0
    for c in range(v.shape[2]):
        dv[row, kvh, c] = 0.0
    b = kb[row]
    if b < 0:
        return
    q_start, lq, k_start, klen, off = rows[b, 0], rows[b, 1], rows[b, 2], rows[b, 3], \
        rows[b, 4]
    j = row - k_start
    if j >= klen:
        return
    ilo, ihi = query_range(j, lq, off, klen, causal, wl, wr)
    for h in range(kvh * group, kvh * group + group):
        slope = slope_of(slopes, has_alibi, b, h)
        for i in range(ilo, ihi):
            t = q_start + i
            lse_v = lse[t, h]
            if lse_v == -math.inf or masked(mask, mstr, has_mask, b, h, i, j):
                continue
            rkey = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
            pd, dsr, _ = pair(q, k, v, dout, t, h, row, kvh, i, j, b, off, scale, softcap,
                              slope, has_alibi, bias, bstr, has_bias, lse_v, delta[t, h],
                              has_drop, rkey, thr, pscale)
            for c in range(k.shape[2]):
                dk[row, kvh, c] += dsr * q[t, h, c]
            for c in range(v.shape[2]):
                dv[row, kvh, c] += pd * dout[t, h, c]


@cuda.jit
def dbias_kernel(q, k, v, dout, lse, delta, dbias, bshape, rows, scale, causal, wl, wr,
                 softcap, slopes, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask,
                 has_drop, seed, thr, pscale):
    w = cuda.grid(1)
    nb, nh, ni, nj = bshape[0], bshape[1], bshape[2], bshape[3]
    if w >= nb * nh * ni:
        return
    n_heads = q.shape[1]
    group = n_heads // k.shape[1]
    bb, hb, ib = w // (nh * ni), (w // ni) % nh, w % ni
    base = w * nj
    for jj in range(nj):
        dbias[base + jj] = 0.0
    b0, b1 = (0, rows.shape[0]) if nb == 1 else (bb, bb + 1)
    h0, h1 = (0, n_heads) if nh == 1 else (hb, hb + 1)
    for b in range(b0, b1):
        q_start, lq, k_start, klen, off = rows[b, 0], rows[b, 1], rows[b, 2], rows[b, 3], \
            rows[b, 4]
        i0, i1 = (0, lq) if ni == 1 else (ib, min(ib + 1, lq))
        for h in range(h0, h1):
            kvh = h // group
            slope = slope_of(slopes, has_alibi, b, h)
            for i in range(i0, i1):
                t = q_start + i
                lse_v = lse[t, h]
                if lse_v == -math.inf:
                    continue
                rkey = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
                lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
                for j in range(lo, hi):
                    if masked(mask, mstr, has_mask, b, h, i, j):
                        continue
                    _, _, ds = pair(q, k, v, dout, t, h, k_start + j, kvh, i, j, b, off,
                                    scale, softcap, slope, has_alibi, bias, bstr, has_bias,
                                    lse_v, delta[t, h], has_drop, rkey, thr, pscale)
                    dbias[base + (j if nj > 1 else 0)] += ds


@cuda.jit
def dropout_forward_kernel(q, k, v, out, lse, rows, tb, scale, causal, wl, wr, softcap,
                           slopes, has_alibi, bias, bstr, has_bias, mask, mstr, has_mask,
                           sinks, has_sinks, seed, thr, pscale):
    w = cuda.grid(1)
    tq, n_heads = q.shape[0], q.shape[1]
    if w >= tq * n_heads:
        return
    t, h = w // n_heads, w % n_heads
    kvh = h // (n_heads // k.shape[1])
    dvn = v.shape[2]
    for c in range(dvn):
        out[t, h, c] = 0.0
    lse[t, h] = -math.inf
    b = tb[t]
    if b < 0:
        return
    i = t - rows[b, 0]
    k_start, klen, off = rows[b, 2], rows[b, 3], rows[b, 4]
    slope = slope_of(slopes, has_alibi, b, h)
    lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
    m = sinks[h] if has_sinks else -math.inf
    for j in range(lo, hi):
        if not masked(mask, mstr, has_mask, b, h, i, j):
            s, _ = score(q, k, t, h, k_start + j, kvh, i, j, b, off, scale, softcap, slope,
                         has_alibi, bias, bstr, has_bias)
            m = max(m, s)
    if m == -math.inf:
        return
    l = math.exp(sinks[h] - m) if has_sinks else 0.0
    rkey = row_key(seed, np.uint64(b), np.uint64(h), np.uint64(i))
    for j in range(lo, hi):
        if masked(mask, mstr, has_mask, b, h, i, j):
            continue
        s, _ = score(q, k, t, h, k_start + j, kvh, i, j, b, off, scale, softcap, slope,
                     has_alibi, bias, bstr, has_bias)
        p = math.exp(s - m)
        l += p
        if keep_bit(rkey, j, thr):
            for c in range(dvn):
                out[t, h, c] += p * v[k_start + j, kvh, c]
    inv = pscale / l
    for c in range(dvn):
        out[t, h, c] *= inv
    lse[t, h] = m + math.log(l)
