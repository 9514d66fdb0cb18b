"""Split-KV decode on the CPU (flash-decoding): few queries per row, a long cache.

The leading arguments of :func:`numba_attn.cpu.forward.flash_forward` (launch.py routes
decode-sized calls here), same storage addressing (see forward.py's module docstring), same
masking/softcap/ALiBi/bias/sinks helpers. What differs is the order of memory traffic:

* a work item is (query block, key split) and covers **all** kv heads, so keys and values
  are streamed as whole storage rows ``k[row, :, :]`` (contiguous ``Hkv * D`` values).
  Reading one head's slice ``k[row, h]`` per item instead jumps ``Hkv * D`` values from
  row to row and defeats the hardware prefetchers (about 4x slower on this machine);
* runs of keys that are contiguous in storage (a page, or the whole contiguous row) are
  walked without per-key block-table division;
* vectors run along head_dim (simd.py): scores take four keys by four query rows in 16
  vector accumulators, reduced together by a transposed lane sum; values accumulate four
  query rows by four vectors of channels in registers over the tile's keys. Key and value
  rows are loaded once per block and converted in registers (float16 / bfloat16 caches
  are never copied to float32), with masked loads for head_dim tails;
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
    split_range,
    tile_needs_mask,
    write_rows,
)
from .simd import (
    lanes,
    vadd,
    vbcast,
    vexp,
    vfma,
    vload,
    vload_tail,
    vmax,
    vmul,
    vnotneginf,
    vsplat,
    vstore,
    vstore_tail,
    vsub,
    vsums_store,
    vzero,
)

TILE = 32  # keys per tile: scores of all rows for one tile stay in L1
MIN_SPLIT_KEYS = 512  # fewer keys per split do not pay for the merge
TARGET_WORK = 16  # work items wanted per call: enough to balance up to ~8 threads


@inline
def _ldv(x, i, n):
    """A vector of ``x.flat[i:]`` of which only the first ``n`` lanes are real (n may be
    <= 0 or >= lanes): a plain load when all lanes are, else a masked one."""
    w = lanes(x)
    if n >= w:
        return vload(x, i)
    return vload_tail(x, i, max(n, 0))


@inline
def _stv(x, i, v, n):
    """Store the first ``n`` lanes of ``v`` at ``x.flat[i:]`` (all of them when n >= lanes)."""
    if n >= lanes(x):
        vstore(x, i, v)
    else:
        vstore_tail(x, i, v, n)


@inline
def _softmax_tile(s, nk, m, mu, l, alpha):
    """Online softmax of a (keys, rows) score tile in vectors across rows: s becomes
    p = exp(s - m_new), l is rescaled and grows, alpha = exp(m_old - m_new) is left for the
    caller's accumulator (forward.online_softmax's contract, without its scalar passes)."""
    nr = s.shape[1]
    w = lanes(s)
    for c in range(0, nr, w):
        n = nr - c
        tm = _ldv(s, c, n)
        for jj in range(1, nk):
            tm = vmax(_ldv(s, jj * nr + c, n), tm)
        mo = _ldv(m, c, n)
        mn = vmax(tm, mo)
        mv = vnotneginf(mn)  # a row that saw no key yet shifts by 0
        a = vexp(vsub(mo, mv))
        acc = vmul(_ldv(l, c, n), a)
        for jj in range(nk):
            x = vexp(vsub(_ldv(s, jj * nr + c, n), mv))
            _stv(s, jj * nr + c, x, n)
            acc = vadd(acc, x)
        _stv(m, c, mn, n)
        _stv(mu, c, mv, n)
        _stv(l, c, acc, n)
        _stv(alpha, c, a, n)


@inline
def _qk4x4(qs, dp, k, o0, o1, o2, o3, d, r, s, jj):
    """s[jj + u, r + t] = qs[r + t] . k.flat[o_u : o_u + d], 4 keys x 4 rows (16 vector
    accumulators; key rows loaded once, converted in registers)."""
    w = lanes(qs)
    z = vzero(qs)
    a00 = a01 = a02 = a03 = z
    a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = z
    a30 = a31 = a32 = a33 = z
    for c in range(0, d, w):
        x0 = _ldv(k, o0 + c, d - c)
        x1 = _ldv(k, o1 + c, d - c)
        x2 = _ldv(k, o2 + c, d - c)
        x3 = _ldv(k, o3 + c, d - c)
        y = vload(qs, r * dp + c)
        a00 = vfma(y, x0, a00)
        a01 = vfma(y, x1, a01)
        a02 = vfma(y, x2, a02)
        a03 = vfma(y, x3, a03)
        y = vload(qs, (r + 1) * dp + c)
        a10 = vfma(y, x0, a10)
        a11 = vfma(y, x1, a11)
        a12 = vfma(y, x2, a12)
        a13 = vfma(y, x3, a13)
        y = vload(qs, (r + 2) * dp + c)
        a20 = vfma(y, x0, a20)
        a21 = vfma(y, x1, a21)
        a22 = vfma(y, x2, a22)
        a23 = vfma(y, x3, a23)
        y = vload(qs, (r + 3) * dp + c)
        a30 = vfma(y, x0, a30)
        a31 = vfma(y, x1, a31)
        a32 = vfma(y, x2, a32)
        a33 = vfma(y, x3, a33)
    vsums_store(s, jj * s.shape[1] + r, s.shape[1],
                (a00, a10, a20, a30, a01, a11, a21, a31, a02, a12, a22, a32, a03, a13, a23,
                 a33))


@inline
def _qk4x1(qs, dp, k, o0, o1, o2, o3, d, r, s, jj):
    """As :func:`_qk4x4` for one row."""
    w = lanes(qs)
    a0 = vzero(qs)
    a1 = a2 = a3 = a0
    for c in range(0, d, w):
        y = vload(qs, r * dp + c)
        a0 = vfma(y, _ldv(k, o0 + c, d - c), a0)
        a1 = vfma(y, _ldv(k, o1 + c, d - c), a1)
        a2 = vfma(y, _ldv(k, o2 + c, d - c), a2)
        a3 = vfma(y, _ldv(k, o3 + c, d - c), a3)
    vsums_store(s, jj * s.shape[1] + r, s.shape[1], (a0, a1, a2, a3))


@inline
def _scores(qs, dp, k, rowidx, nk, n_kv, nrg, s, d):
    """s[jj, r] = qs[r] . k[rowidx[jj], r // nrg] for the tile's keys jj < nk, all rows.

    s has room for nk rounded up to 4 keys (the extra keys repeat the last one).
    Keys outer, kv heads inner: storage rows are read front to back (prefetch-friendly).
    """
    for jj in range(0, nk, 4):
        for kvh in range(n_kv):
            o0 = (rowidx[jj] * n_kv + kvh) * d
            o1 = (rowidx[min(jj + 1, nk - 1)] * n_kv + kvh) * d
            o2 = (rowidx[min(jj + 2, nk - 1)] * n_kv + kvh) * d
            o3 = (rowidx[min(jj + 3, nk - 1)] * n_kv + kvh) * d
            r = kvh * nrg
            r_end = r + nrg
            while r + 4 <= r_end:
                _qk4x4(qs, dp, k, o0, o1, o2, o3, d, r, s, jj)
                r += 4
            while r < r_end:
                _qk4x1(qs, dp, k, o0, o1, o2, o3, d, r, s, jj)
                r += 1


@inline
def _pv4(acc, dvp, v, vo, nk, s, r, c, dv):
    """acc[r + t, c : c + 4W] += sum_jj s[jj, r + t] v.flat[vo[jj] + c ...], 4 rows x 4
    vectors of channels held in registers over the tile's keys."""
    w = lanes(acc)
    b0 = r * dvp + c
    b1 = b0 + dvp
    b2 = b1 + dvp
    b3 = b2 + dvp
    a00 = vload(acc, b0)
    a01 = vload(acc, b0 + w)
    a02 = vload(acc, b0 + 2 * w)
    a03 = vload(acc, b0 + 3 * w)
    a10 = vload(acc, b1)
    a11 = vload(acc, b1 + w)
    a12 = vload(acc, b1 + 2 * w)
    a13 = vload(acc, b1 + 3 * w)
    a20 = vload(acc, b2)
    a21 = vload(acc, b2 + w)
    a22 = vload(acc, b2 + 2 * w)
    a23 = vload(acc, b2 + 3 * w)
    a30 = vload(acc, b3)
    a31 = vload(acc, b3 + w)
    a32 = vload(acc, b3 + 2 * w)
    a33 = vload(acc, b3 + 3 * w)
    n = dv - c
    for jj in range(nk):
        o = vo[jj] + c
        x0 = _ldv(v, o, n)
        x1 = _ldv(v, o + w, n - w)
        x2 = _ldv(v, o + 2 * w, n - 2 * w)
        x3 = _ldv(v, o + 3 * w, n - 3 * w)
        p = vbcast(s, jj * s.shape[1] + r)
        a00 = vfma(p, x0, a00)
        a01 = vfma(p, x1, a01)
        a02 = vfma(p, x2, a02)
        a03 = vfma(p, x3, a03)
        p = vbcast(s, jj * s.shape[1] + r + 1)
        a10 = vfma(p, x0, a10)
        a11 = vfma(p, x1, a11)
        a12 = vfma(p, x2, a12)
        a13 = vfma(p, x3, a13)
        p = vbcast(s, jj * s.shape[1] + r + 2)
        a20 = vfma(p, x0, a20)
        a21 = vfma(p, x1, a21)
        a22 = vfma(p, x2, a22)
        a23 = vfma(p, x3, a23)
        p = vbcast(s, jj * s.shape[1] + r + 3)
        a30 = vfma(p, x0, a30)
        a31 = vfma(p, x1, a31)
        a32 = vfma(p, x2, a32)
        a33 = vfma(p, x3, a33)
    vstore(acc, b0, a00)
    vstore(acc, b0 + w, a01)
    vstore(acc, b0 + 2 * w, a02)
    vstore(acc, b0 + 3 * w, a03)
    vstore(acc, b1, a10)
    vstore(acc, b1 + w, a11)
    vstore(acc, b1 + 2 * w, a12)
    vstore(acc, b1 + 3 * w, a13)
    vstore(acc, b2, a20)
    vstore(acc, b2 + w, a21)
    vstore(acc, b2 + 2 * w, a22)
    vstore(acc, b2 + 3 * w, a23)
    vstore(acc, b3, a30)
    vstore(acc, b3 + w, a31)
    vstore(acc, b3 + 2 * w, a32)
    vstore(acc, b3 + 3 * w, a33)


@inline
def _pv1(acc, dvp, v, vo, nk, s, r, c, dv):
    """As :func:`_pv4` for one row."""
    w = lanes(acc)
    b0 = r * dvp + c
    a0 = vload(acc, b0)
    a1 = vload(acc, b0 + w)
    a2 = vload(acc, b0 + 2 * w)
    a3 = vload(acc, b0 + 3 * w)
    n = dv - c
    for jj in range(nk):
        o = vo[jj] + c
        p = vbcast(s, jj * s.shape[1] + r)
        a0 = vfma(p, _ldv(v, o, n), a0)
        a1 = vfma(p, _ldv(v, o + w, n - w), a1)
        a2 = vfma(p, _ldv(v, o + 2 * w, n - 2 * w), a2)
        a3 = vfma(p, _ldv(v, o + 3 * w, n - 3 * w), a3)
    vstore(acc, b0, a0)
    vstore(acc, b0 + w, a1)
    vstore(acc, b0 + 2 * w, a2)
    vstore(acc, b0 + 3 * w, a3)


@inline
def _values(acc, dvp, v, rowidx, vo, nk, n_kv, nrg, s, dv):
    """acc[r] += sum_jj s[jj, r] * v[rowidx[jj], r // nrg] over the tile's keys jj < nk.

    acc rows are padded to dvp, a multiple of 4 vectors; channels past dv load as zero.
    """
    w = lanes(acc)
    for kvh in range(n_kv):
        for jj in range(nk):
            vo[jj] = (rowidx[jj] * n_kv + kvh) * dv
        r_end = (kvh + 1) * nrg
        for c in range(0, dv, 4 * w):
            r = kvh * nrg
            while r + 4 <= r_end:
                _pv4(acc, dvp, v, vo, nk, s, r, c, dv)
                r += 4
            while r < r_end:
                _pv1(acc, dvp, v, vo, nk, s, r, c, dv)
                r += 1


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
                 mask, mstr, has_mask, sinks, has_sinks):
    """Decode forward; arguments as the first 26 of
    :func:`numba_attn.cpu.forward.flash_forward` (tiles are :data:`TILE` keys read in
    place from storage; the kernel picks and merges its own key splits).
    """
    dt = q.dtype
    tq, n_heads, d = q.shape
    n_kv, dv = k.shape[1], v.shape[2]
    group = n_heads // n_kv
    nl = lanes(q)
    dp = (d + nl - 1) // nl * nl
    dvp = (dv + 4 * nl - 1) // (4 * nl) * (4 * nl)
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

            hh = np.empty(nr, np.int64)  # query head of each row
            for r in range(nr):
                hh[r] = (r // nrg) * group + (r % nrg) // nq
            qs0, qi, rlo, rhi, slope_r = init_rows(q, q_start, i0, nq, hh, off, klen, causal,
                                                   wl, wr, scale, slopes, has_alibi, b)
            qs = np.zeros(nr * dp, dt)  # scaled query rows, zero-padded to dp
            for r in range(nr):
                for c in range(d):
                    qs[r * dp + c] = qs0[r, c]
            m, mu, l, alpha, tmax, junk, acc0 = init_state(nr, 1, hh, sinks, has_sinks, split,
                                                           dt)
            acc = np.zeros(nr * dvp, dt)
            sbuf = np.empty(TILE * nr, dt)
            rowidx = np.empty(TILE, np.int64)
            vo = np.empty(TILE, np.int64)
            for j0 in range(js, je, TILE):
                j1 = min(j0 + TILE, je)
                nk = j1 - j0
                nk4 = (nk + 3) // 4 * 4
                s = sbuf[: nk4 * nr].reshape((nk4, nr))  # scores, (keys, rows)
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
                _scores(qs, dp, k, rowidx, nk, n_kv, nrg, s, d)
                positional = tile_needs_mask(i0, i1, j0, j1, off, causal, wl, wr)
                fixup_tile(s, nk, nr, j0, b, qi, hh, rlo, rhi, slope_r, off, positional, softcap,
                           has_alibi, bias, bstr, has_bias, mask, mstr, has_mask)
                _softmax_tile(s, nk, m, mu, l, alpha)
                for r in range(nr):
                    if alpha[r] != 1.0:
                        a = vsplat(alpha[r])
                        for c in range(0, dvp, nl):
                            vstore(acc, r * dvp + c, vmul(vload(acc, r * dvp + c), a))
                _values(acc, dvp, v, rowidx, vo, nk, n_kv, nrg, s, dv)
            write_rows(acc.reshape((nr, dvp)), m, l, qi, hh, q_start, split, ns, out, lse, pout,
                       plse)
    if ns > 1:
        tq, n_heads = pout.shape[1], pout.shape[2]
        for w in prange(tq * n_heads):
            merge_split_row(pout, plse, out, lse, w // n_heads, w % n_heads)
