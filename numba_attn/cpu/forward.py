"""Flash-attention forward on the CPU: ``prange`` over (row, query block, kv head, split).

One work item holds all query heads of one GQA group for a block of queries and streams
K/V tiles once for the whole group (K/V are never repeated). Tile products are the
register-blocked micro-kernels of ``microkernels.py`` on the SIMD layer (``simd.py``),
fused with an online softmax in vectors: no BLAS, and a score strip never leaves L1/L2.
Rows sit in vector lanes ("rows in lanes"): scores are kept transposed, (keys, rows), so
the softmax steps are lane-wise, and the output accumulates as O^T (Dv, rows). Tiles that
no query of a strip can see are skipped; positional masks are evaluated only on strips
that need them. Nothing of size seqlen_q x seqlen_k is ever allocated.

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
from .._modcache import ModKernel
from .atomics import fetch_add
from .expmath import exp_diff_acc
from .microkernels import pv6, pv8, qk4, qk6, qk8, qk12
from .simd import (
    block_rows,
    lanes,
    vadd,
    vexp,
    vload,
    vload_tail,
    vmax,
    vmul,
    vnotneginf,
    vsplat,
    vstore,
    vstore_tail,
    vsub,
    vtanh,
)
from .simd import VECTOR_BYTES

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
    """Normalise an item's accumulators (rows, >= Dv) into out/lse (or split ``split``'s
    partials)."""
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
            for c in range(out.shape[2]):  # acc may be wider (padding)
                out[t, h, c] = acc[r, c] * inv
            lse[t, h] = lv
        else:
            for c in range(out.shape[2]):
                part_out[split, t, h, c] = acc[r, c] * inv
            part_lse[split, t, h] = lv


@inline
def pack_rows(q, q_start, i0, nq, group, kvh, nr, nrp, off, klen, causal, wl, wr, scale,
              slopes, has_alibi, b, qt, hh, qi, rlo, rhi, slope_r):
    """Per-row data of a forward work item, padded to ``nrp`` rows (a multiple of the strip).

    Row ``r < nr`` is query ``i0 + r % nq`` of head ``kvh * group + r // nq``; padding rows
    repeat the last real row's metadata (their results are never written). Fills the
    lane's buffers: qt (D * nrp,) = scale * q transposed (channel-major, rows in lanes,
    zero padding), hh, qi, rlo, rhi (each row's visible keys [rlo, rhi)) and slope_r.
    """
    d = q.shape[2]
    for r in range(nrp):
        rr = min(r, nr - 1)
        i = i0 + rr % nq
        h = kvh * group + rr // nq
        hh[r] = h
        qi[r] = i
        rlo[r], rhi[r] = key_range(i, i + 1, off, klen, causal, wl, wr)
        if has_alibi:
            slope_r[r] = slopes[b if slopes.shape[0] > 1 else 0, h]
    for c in range(d):
        for r in range(nr, nrp):
            qt[c * nrp + r] = 0.0
    for r in range(nr):
        qrow = q[q_start + qi[r], hh[r]]
        for c in range(d):
            qt[c * nrp + r] = qrow[c] * scale


@inline
def strip_softmax(st, ne, m, l, s0):
    """Online-softmax step of one strip (2 vectors of rows) over ``ne`` keys of ``st``
    (keys, 2W): st becomes p = exp(s - m_new); l is rescaled and grows; returns the two
    alpha = exp(m_old - m_new) vectors for the accumulators."""
    w = lanes(st)
    mx0 = vload(st, 0)
    mx1 = vload(st, w)
    for jj in range(1, ne):
        mx0 = vmax(mx0, vload(st, jj * 2 * w))
        mx1 = vmax(mx1, vload(st, jj * 2 * w + w))
    mo0 = vload(m, s0)
    mo1 = vload(m, s0 + w)
    mn0 = vmax(mo0, mx0)
    mn1 = vmax(mo1, mx1)
    mu0 = vnotneginf(mn0)  # exp shift: m where finite, else 0 (exp(-inf - 0) = 0)
    mu1 = vnotneginf(mn1)
    a0 = vexp(vsub(mo0, mu0))
    a1 = vexp(vsub(mo1, mu1))
    l0 = vmul(vload(l, s0), a0)
    l1 = vmul(vload(l, s0 + w), a1)
    for jj in range(ne):
        p0 = vexp(vsub(vload(st, jj * 2 * w), mu0))
        p1 = vexp(vsub(vload(st, jj * 2 * w + w), mu1))
        vstore(st, jj * 2 * w, p0)
        vstore(st, jj * 2 * w + w, p1)
        l0 = vadd(l0, p0)
        l1 = vadd(l1, p1)
    vstore(m, s0, mn0)
    vstore(m, s0 + w, mn1)
    vstore(l, s0, l0)
    vstore(l, s0 + w, l1)
    return a0, a1


# The micro-kernels of this target, picked once at import (MR = 8 keys / channels with 32
# vector registers, AVX-512; 6 with 16): a kernel names only its target's family, so a cold
# compile types and optimises one family instead of both behind a branch on ``mr``
WIDE = VECTOR_BYTES == 64
qk_mr = qk8 if WIDE else qk6
pv_mr = pv8 if WIDE else pv6


def _strip_scores_wide(k, kb, nep, qt, ldq, s0, d, st, mr):
    u = 0
    while u + 12 <= nep:
        qk12(k, kb, u, qt, ldq, s0, d, st)
        u += 12
    while u + 8 <= nep:
        qk8(k, kb, u, qt, ldq, s0, d, st)
        u += 8
    while u < nep:
        qk4(k, kb, u, qt, ldq, s0, d, st)
        u += 4


def _strip_scores_narrow(k, kb, nep, qt, ldq, s0, d, st, mr):
    for u in range(0, nep, 6):
        qk6(k, kb, u, qt, ldq, s0, d, st)


strip_scores = inline(_strip_scores_wide if WIDE else _strip_scores_narrow)
strip_scores.__doc__ = """Scores of keys [0, nep) (nep a multiple of mr) of a tile against a
strip: 12-key micro-kernels for the bulk on 32-register targets (mr = 8), then 8 / 4; 6-key
ones else."""


@inline
def strip_values(v, vb, ne, st, ot, ldo, s0, dvp, dv, a0, a1, mr):
    """O^T channels [0, dvp) of a strip = alpha * O^T + V^T P over its ``ne`` keys, in
    blocks of mr channels (channels past ``dv`` of v read channel dv - 1 into padding)."""
    for c0 in range(0, dvp, mr):
        pv_mr(v, vb, ne, st, ot, ldo, s0, c0, dv, a0, a1)


@inline
def strip_softcap(st, ne, softcap):
    """st = softcap * tanh(st / softcap) over ``ne`` keys of a strip (vector tanh)."""
    w = lanes(st)
    one = softcap / softcap  # 1 in the compute dtype
    cap = vsplat(softcap)
    inv = vsplat(one / softcap)
    for u in range(0, ne * 2 * w, w):
        vstore(st, u, vmul(cap, vtanh(vmul(vload(st, u), inv))))


@inline
def write_item(ot, nrp, m, l, nr, qi, hh, q_start, split, nsplit, out, lse, part_out,
               part_lse):
    """Normalise O^T (Dv, nrp) into out / lse (or split ``split``'s partials); rows with no
    visible key (and no sink) get out = 0, lse = -inf."""
    dv = out.shape[2]
    for r in range(nr):
        t = q_start + qi[r]
        lv = m[r] + math.log(l[r]) if l[r] > 0.0 else -np.inf
        inv = 1.0 / l[r] if l[r] > 0.0 else 0.0
        if nsplit == 1:
            lse[t, hh[r]] = lv
            orow = out[t, hh[r]]
        else:
            part_lse[split, t, hh[r]] = lv
            orow = part_out[split, t, hh[r]]
        for c in range(dv):
            orow[c] = ot[c * nrp + r] * inv


@inline
def strip_score_mod(st, ne, nrs, j0, b, qi, hh, s0, smod, sargs):
    """st[jj, r] = smod(st[jj, r], b, head, q_idx, kv_idx, *sargs) over ``ne`` keys of a
    strip (rows s0 .. s0 + nrs - 1 of the item)."""
    for jj in range(ne):
        j = j0 + jj
        for r in range(nrs):
            u = jj * nrs + r
            st[u] = smod(st[u], b, hh[s0 + r], qi[s0 + r], j, *sargs)


@inline
def strip_mask_mod(st, ne, nrs, j0, b, qi, hh, s0, mmod, margs):
    """st[jj, r] = -inf where not mmod(b, head, q_idx, kv_idx, *margs)."""
    ninf = -np.inf
    for jj in range(ne):
        j = j0 + jj
        for r in range(nrs):
            if not mmod(b, hh[s0 + r], qi[s0 + r], j, *margs):
                st[jj * nrs + r] = ninf


@inline
def strip_block_kind(bflags, bq, bk, b, qi, hh, s0, nrs, j0, j1):
    """0 when every block of the block mask that the strip's rows meet in keys [j0, j1) is
    empty, 2 when all are full, else 1 (the mask_mod must run)."""
    bb = b if bflags.shape[0] > 1 else 0
    any_set = False
    all_full = True
    kb0 = j0 // bk
    kb1 = (j1 - 1) // bk
    for r in range(s0, s0 + nrs):
        h = hh[r] if bflags.shape[1] > 1 else 0
        fq = bflags[bb, h, qi[r] // bq]
        for kb in range(kb0, kb1 + 1):
            f = fq[kb]
            if f != 0:
                any_set = True
            if f != 2:
                all_full = False
    if not any_set:
        return 0
    return 2 if all_full else 1


@inline
def copy_row(src, so, dst, do, n):
    """dst.flat[do : do + n] = src.flat[so : so + n] converted to dst's dtype (vectors,
    masked tail)."""
    w = lanes(dst)
    c = 0
    while c + w <= n:
        vstore(dst, do + c, vload(src, so + c))
        c += w
    if c < n:
        vstore_tail(dst, do + c, vload_tail(src, so + c, n - c), n - c)


@inline
def pack_tile(k, v, b, j0, nk, kvh, k_start, block_table, block_size, kt, vt, nkp, dvp):
    """Keys j0 .. j0 + nk - 1 of batch row b, kv head kvh, into kt (nkp, D) and vt
    (nkp, dvp), converted to the compute dtype; padding keys and channels are zero."""
    n_kv, d, dv = k.shape[1], k.shape[2], v.shape[2]
    jj = 0
    while jj < nk:  # runs of keys contiguous in storage: no per-key division
        j = j0 + jj
        blk = j // block_size
        within = j - blk * block_size
        run = min(block_size - within, nk - jj)
        base = k_start + block_table[b, blk] * block_size + within
        for u in range(run):
            row = base + u
            copy_row(k, (row * n_kv + kvh) * d, kt, (jj + u) * d, d)
            copy_row(v, (row * n_kv + kvh) * dv, vt, (jj + u) * dvp, dv)
            for c in range(dv, dvp):
                vt[(jj + u) * dvp + c] = 0.0
        jj += run
    for u in range(nk * d, nkp * d):
        kt[u] = 0.0
    for u in range(nk * dvp, nkp * dvp):
        vt[u] = 0.0


@jit(parallel=True)
def flash_forward(q, k, v, out, lse, part_out, part_lse, rows, items, block_table, block_size,
                  scale, causal, wl, wr, softcap, slopes, has_alibi, bias, bstr, has_bias,
                  mask, mstr, has_mask, sinks, has_sinks, nsplit, block_k, schedule, n_lanes,
                  kpack, vpack, packed, smod, sargs, mmod, margs, bflags, bq, bk):
    """Fused forward on the SIMD micro-kernels; see the module docstring for the layout.

    q (Tq, H, D) in the compute dtype; k (N, Hkv, D), v (N, Hkv, Dv) storage (float32,
    float64, or float16 / bfloat16 bit views, see simd.kernel_storage). With ``packed``
    (contiguous storage), kpack (Hkv, N, D) / vpack (Hkv, N, Dv) are head-major copies of
    k / v in the storage dtype (:func:`head_major`), read in place; otherwise (paged) each
    tile is gathered into scratch.
    out (Tq, H, Dv), lse (Tq, H). With ``nsplit > 1`` each item's key range is cut into
    ``nsplit`` parts written to part_out (nsplit, Tq, H, Dv) / part_lse (nsplit, Tq, H).

    A work item (batch row, query block, kv head, split) holds all query heads of the
    GQA group as rows, padded to strips of 2 vectors (rows in lanes). For each key tile
    of ``block_k`` keys and each strip: scores (keys, rows) by the QK micro-kernel straight
    from K storage, soft-cap / ALiBi / bias / masks (masks only where the strip's rows do
    not all see the tile), online softmax in vectors, then O^T (Dv, rows) += V^T P by the
    PV micro-kernel. Strips that see no key of a tile are skipped,
    and a strip stops at its last visible key. Work items are taken in ``schedule`` order
    (decreasing cost) by ``n_lanes`` lanes through an atomic counter.

    User modifications (numba_attn.mods) are compile-time specialisations: ``smod`` /
    ``mmod`` are None (their code is pruned: the default kernel is unchanged) or jitted
    functions called with ``*sargs`` / ``*margs``; ``bflags`` (None or int8 (B|1, H|1,
    nqb, nkb), 0 empty / 1 partial / 2 full per bq x bk block) skips empty strip-tiles and
    calls ``mmod`` only on partial ones. score_mod runs on the scaled scores, before
    soft-cap, ALiBi, bias and masks; mask_mod with the masks. The cached dispatcher serves
    the default path; :data:`flash_forward_mods` (the same code with the mods as globals of
    a generated file, cached on disk per mod: numba_attn._modcache) the mods.
    """
    dt = q.dtype
    n_heads, d = q.shape[1], q.shape[2]
    n_kv, dv = k.shape[1], v.shape[2]
    group = n_heads // n_kv
    w = lanes(q)
    nrs = 2 * w  # rows per strip
    mr = block_rows(q)  # keys / value channels per micro-kernel
    dvp = (dv + mr - 1) // mr * mr
    nkt = (block_k + mr - 1) // mr * mr
    n_items = items.shape[0]
    n_work = n_items * n_kv * nsplit
    max_nq = 1
    for it in range(n_items):
        max_nq = max(max_nq, items[it, 2] - items[it, 1])
    max_nrp = (group * max_nq + nrs - 1) // nrs * nrs
    counter = np.zeros(1, np.int64)
    for lane in prange(n_lanes):
        # scratch of the lane, reused by its items (fresh pages per item cost page faults)
        qt = np.empty(d * max_nrp, dt)
        hh = np.empty(max_nrp, np.int64)
        qi = np.empty(max_nrp, np.int64)
        rlo = np.empty(max_nrp, np.int64)
        rhi = np.empty(max_nrp, np.int64)
        slope_r = np.zeros(max_nrp, dt)
        m = np.empty(max_nrp, dt)
        l = np.empty(max_nrp, dt)
        ot = np.empty(dvp * max_nrp, dt)  # O^T (Dv padded, rows)
        st = np.empty(nkt * nrs, dt)  # scores / probabilities of a strip (keys, rows)
        nscr = 1 if packed else nkt
        kt = np.empty(nscr * d, dt)  # a paged tile's keys and values (compute dtype)
        vt = np.empty(nscr * dvp, dt)
        kb = np.arange(0, nkt * d, d)  # offsets of key rows in kt / vt (or kpack)
        vb = np.arange(0, nkt * dvp, dvp)
        while True:
            idx = fetch_add(counter, 0, 1)
            if idx >= n_work:
                break
            wk = schedule[idx]
            split = wk % nsplit
            kvh = (wk // nsplit) % n_kv
            it = wk // (nsplit * n_kv)
            b, i_first, i_end = items[it, 0], items[it, 1], items[it, 2]
            q_start, k_start, klen, off = rows[b, 0], rows[b, 2], rows[b, 3], rows[b, 4]
            i0 = i_first - q_start
            i1 = i_end - q_start
            nq = i1 - i0
            nr = group * nq
            nrp = (nr + nrs - 1) // nrs * nrs
            lo, hi = key_range(i0, i1, off, klen, causal, wl, wr)
            js, je = split_range(lo, hi, nsplit, split, block_k)

            pack_rows(q, q_start, i0, nq, group, kvh, nr, nrp, off, klen, causal, wl, wr,
                      scale, slopes, has_alibi, b, qt, hh, qi, rlo, rhi, slope_r)
            for r in range(nrp):
                m[r] = -np.inf
                l[r] = 0.0
            if has_sinks and split == 0:  # a sink starts a row at m = sink, l = 1
                for r in range(nrp):
                    m[r] = sinks[hh[r]]
                    l[r] = 1.0
            for u in range(dvp * nrp):
                ot[u] = 0.0
            # flat (1-D) like the paged scratch kt / vt: for float32 / float64 storage the
            # two paths share one specialisation of each strip helper and micro-kernel
            kh = kpack[kvh].reshape(kpack.shape[1] * kpack.shape[2])
            vh = vpack[kvh].reshape(vpack.shape[1] * vpack.shape[2])
            for j0 in range(js, je, block_k):
                j1 = min(j0 + block_k, je)
                nk = j1 - j0
                if packed:  # key rows of kpack[kvh]; padding keys repeat the last one
                    for u in range(nkt):
                        kb[u] = (k_start + j0 + min(u, nk - 1)) * d
                        vb[u] = (k_start + j0 + min(u, nk - 1)) * dv
                else:
                    pack_tile(k, v, b, j0, nk, kvh, k_start, block_table, block_size, kt, vt,
                              (nk + mr - 1) // mr * mr, dvp)
                for s0 in range(0, nrp, nrs):
                    slo = rlo[s0]
                    shi = rhi[s0]
                    for r in range(s0 + 1, s0 + nrs):
                        slo = min(slo, rlo[r])
                        shi = max(shi, rhi[r])
                    ne = min(j1, shi) - j0  # keys of the tile the strip may see
                    if ne <= 0 or slo >= j1:
                        continue
                    mm_on = False
                    if mmod is not None:
                        mm_on = True
                        if bflags is not None:
                            kind = strip_block_kind(bflags, bq, bk, b, qi, hh, s0, nrs, j0,
                                                    j0 + ne)
                            if kind == 0:
                                continue
                            mm_on = kind == 1
                    nep = (ne + mr - 1) // mr * mr
                    if packed:
                        strip_scores(kh, kb, nep, qt, nrp, s0, d, st, mr)
                    else:
                        strip_scores(kt, kb, nep, qt, nrp, s0, d, st, mr)
                    if smod is not None:
                        strip_score_mod(st, ne, nrs, j0, b, qi, hh, s0, smod, sargs)
                    if softcap > 0.0:
                        strip_softcap(st, ne, softcap)
                    needs = slo > j0
                    for r in range(s0, s0 + nrs):
                        needs = needs or rlo[r] > j0 or rhi[r] < j0 + ne
                    if has_alibi or has_bias or has_mask or needs:
                        fixup_tile(st[:ne * nrs].reshape((ne, nrs)), ne, nrs, j0, b,
                                   qi[s0:], hh[s0:], rlo[s0:], rhi[s0:], slope_r[s0:], off,
                                   needs, 0.0, has_alibi, bias, bstr, has_bias, mask, mstr,
                                   has_mask)
                    if mmod is not None:
                        if mm_on:
                            strip_mask_mod(st, ne, nrs, j0, b, qi, hh, s0, mmod, margs)
                    a0, a1 = strip_softmax(st, ne, m, l, s0)
                    if packed:
                        strip_values(vh, vb, ne, st, ot, nrp, s0, dvp, dv, a0, a1, mr)
                    else:
                        strip_values(vt, vb, ne, st, ot, nrp, s0, dvp, dvp, a0, a1, mr)
            write_item(ot, nrp, m, l, nr, qi, hh, q_start, split, nsplit, out, lse, part_out,
                       part_lse)


# the same kernel for calls with user mods: a variant per distinct mod, with the mod a module
# global of a generated file, cached on disk (numba_attn._modcache)
flash_forward_mods = ModKernel(flash_forward)


@jit(parallel=True)
def head_major(x, out):
    """out (Hkv, N, D) = x (N, Hkv, D) transposed, any dtype (one parallel pass)."""
    n, hk, d = x.shape
    nchunk = (n + 255) // 256
    for w in prange(hk * nchunk):
        h = w // nchunk
        j0 = (w % nchunk) * 256
        oh = out[h]
        for j in range(j0, min(n, j0 + 256)):
            src = x[j, h]
            dst = oh[j]
            for c in range(d):
                dst[c] = src[c]


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
