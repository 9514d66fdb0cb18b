"""Flash-attention forward on the GPU (``@cuda.jit``), the twin of ``cpu/forward.py``.

One thread block per (work item, kv head [x head chunk], key split); a work item is a tile
of queries of one batch row (``items`` as on the CPU). The block holds every query head of
the GQA group (or a chunk of it, when the group's tiles would not fit) for its queries:
``rows = group * block_q`` score rows, ``r = g * nq + (i - i0)``, spread over the warps
(``rows_per_warp`` consecutive rows per warp). For each key tile:

* the K/V tile is staged once in shared memory (float32, or float64 for float64 data)
  through the block table, and serves every query head of the group; the tiles (q, k, v,
  p and the tile's storage rows) sit in one static buffer, or in dynamic shared memory
  for tiles past the 48 KiB static limit (``dynamic``, offsets from :func:`dynamic_layout`);
* lane ``l`` of a warp scores keys ``l, l + 32, ...`` of the tile against all rows of its
  warp (q rows are in shared memory, already scaled);
* soft-cap, ALiBi, bias, mask and positional masking as DESIGN.md orders them;
* the row max and sum are warp reductions (``shfl_xor_sync``), the running max / sum / output
  accumulator live in registers (lane ``l`` owns output columns ``l, l + 32, ...``); the
  warp's probabilities go through a per-warp shared-memory strip (one ``syncwarp`` per
  tile) to the ``P @ V`` update, which reads each V element once for all rows of the warp.

Storage addressing is the CPU one: key ``j`` of row ``b`` is storage row
``k_start + block_table[b, j // block_size] * block_size + j % block_size``. Key splits
(``gridDim.z > 1``, decode-sized problems) write partial results to ``part_out`` /
``part_lse`` that :func:`merge_splits` combines with the LSE rule; split 0 carries the sink.

bfloat16 storage reaches the kernel as uint16 bits (``bf16``): widened on load, rounded
to nearest even on store (:mod:`numba_attn.cuda.bf16`). 8-bit K/V storage (``quant``:
int8, or float8 as uint8 bits) is dequantized as the tile is staged: ``value * scale``
with the float32 scale of its (storage row, kv head) from ``k_scale`` / ``v_scale``
(:mod:`numba_attn.cuda.quant`); q and out keep their own dtype.

Kernels are built per specialisation (dtype, head dims, group, tile sizes, warps,
bfloat16 storage, dynamic tiles, heads per block, and the user's score_mod / mask_mod as
device functions) by :func:`make_forward`; everything else is a runtime argument. They
run unchanged under the CUDA simulator (tests add warp shuffles to the simulator there).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda

from .. import masking
from . import bf16 as bfm
from . import quant as cq

WARP = 32
FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True, inline=True)
def warp_max(x):
    """Maximum over the 32 lanes of a warp (every lane gets it)."""
    sh = 16
    while sh > 0:
        x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, sh))
        sh //= 2
    return x


@cuda.jit(device=True, inline=True)
def warp_sum(x):
    """Sum over the 32 lanes of a warp (every lane gets it)."""
    sh = 16
    while sh > 0:
        x += cuda.shfl_xor_sync(FULL_MASK, x, sh)
        sh //= 2
    return x


key_range = cuda.jit(device=True, inline=True)(masking.key_range)
tile_needs_mask = cuda.jit(device=True, inline=True)(masking.tile_needs_mask)
split_range = cuda.jit(device=True, inline=True)(masking.split_range)


@cuda.jit(device=True, inline=True)
def visible(i, j, off, causal, wl, wr):
    if causal == 1 and j > i + off:
        return False
    if causal == 2 and j > i:
        return False
    if wr >= 0 and j > i + off + wr:
        return False
    if wl >= 0 and j < i + off - wl:
        return False
    return True


_KERNELS = {}


@cuda.jit(device=True, inline=True)
def _no_score_mod(s, b, h, i, j, args):
    return s


@cuda.jit(device=True, inline=True)
def _no_mask_mod(b, h, i, j, args):
    return True


_DEVICE_MODS = {}  # (python function, kind, number of args) -> device function


def device_mod(fn, kind, nargs):
    """A user mod as an inlined device function taking its argument tuple whole:
    ``f(s, b, h, i, j, args)`` (score) / ``f(b, h, i, j, args)`` (mask), which calls the
    user's function with ``args`` spelled out (Numba's inliner refuses ``*args`` calls,
    and inlining spares the compile a device context)."""
    py = getattr(fn, "py_func", fn)
    key = (py, kind, nargs)
    dev = _DEVICE_MODS.get(key)
    if dev is None:
        lead = "s, b, h, i, j" if kind == "score" else "b, h, i, j"
        spelled = "".join(f", args[{n}]" for n in range(nargs))
        src = f"def call({lead}, args):\n    return user({lead}{spelled})\n"
        env = {"user": cuda.jit(device=True, inline=True)(py)}
        exec(src, env)  # noqa: S102 (fixed template, no user text)
        dev = _DEVICE_MODS[key] = cuda.jit(device=True, inline=True)(env["call"])
    return dev


def make_forward(acc_dtype, d, dv, group, block_q, block_k, num_warps, *, bf16=False,
                 dynamic=False, heads=None, smod=None, mmod=None, blocks=False, n_sargs=0,
                 n_margs=0, quant=0):
    """The forward kernel specialised on its compile-time constants (cached).

    ``bf16``: q, k, v and out are bfloat16 storage given as uint16 bits (see
    :mod:`numba_attn.cuda.bf16`); the kernel widens on load and rounds on store.
    ``dynamic``: the tiles live in dynamic shared memory (one buffer carved as
    :func:`dynamic_layout` says), so they may exceed the 48 KiB of static shared memory;
    launch with ``kernel[grid, threads, stream, launch.shared_bytes(...)]``.
    ``heads``: query heads per block (a divisor of ``group``, default all of them); a
    group too large for one block's tiles (MLA: 128 heads over one latent kv head) is
    spread over ``group // heads`` blocks, ``blockIdx.y = kv_head * (group // heads) +
    chunk``.

    Launch as ``kernel[(n_items, num_kv_heads * (group // heads), nsplit), 32 * num_warps]``.
    ``meta`` is one int64 vector (a single host-to-device copy): ``rows`` (batch, 5)
    flattened, then ``items`` (n_items, 3) flattened from offset ``items_off``.

    ``smod`` / ``mmod``: user mods (numba_attn.mods) compiled in as device functions (one
    kernel per function object); ``blocks``: a block mask's flags skip empty tiles.
    ``quant``: 8-bit K/V storage (:data:`numba_attn.cuda.quant.INT8` / ``E4M3`` /
    ``E5M2``; 0 for float storage), dequantized with the ``k_scale`` / ``v_scale`` (N, Hkv)
    float32 arguments (one-element dummies otherwise).
    """
    heads = group if heads is None else int(heads)
    if heads < 1 or group % heads:
        raise ValueError(f"heads: {heads} does not divide the group size {group}")
    key = (np.dtype(acc_dtype).str, d, dv, group, block_q, block_k, num_warps, bool(bf16),
           bool(dynamic), heads, smod, mmod, bool(blocks), n_sargs, n_margs, int(quant))
    kern = _KERNELS.get(key)
    if kern is None:
        kern = _KERNELS[key] = _build_forward(
            np.dtype(acc_dtype), d, dv, group, block_q, block_k, num_warps, bool(bf16),
            bool(dynamic), heads, smod, mmod, bool(blocks), n_sargs, n_margs, int(quant))
    return kern


def dynamic_layout(acc_itemsize, d, dv, group, block_q, block_k, num_warps):
    """Offsets (in accumulator elements) of the tiles in the dynamic shared buffer:
    ``krow`` (block_k int64) first, so every tile stays aligned, then q, k, v, p.
    Returns (q0, k0, v0, p0, end); ``end * acc_itemsize`` bytes in all."""
    rows = group * block_q
    qrows = -(-rows // num_warps) * num_warps
    pcols = -(-block_k // WARP) * WARP
    q0 = block_k * 8 // acc_itemsize
    k0 = q0 + qrows * d
    v0 = k0 + block_k * (d + 1)
    p0 = v0 + block_k * dv
    return q0, k0, v0, p0, p0 + qrows * pcols


def _build_forward(acc_dtype, D, DV, GROUP_ALL, BLOCK_Q, BK, NW, BF16, DYN, GROUP, smod,
                   mmod, blocks, n_sargs, n_margs, QUANT=0):
    CHUNKS = GROUP_ALL // GROUP  # blocks per kv head (GROUP: query heads of this block)
    HAS_SMOD = smod is not None
    HAS_MMOD = mmod is not None
    BLOCKS = blocks and HAS_MMOD
    SMOD = device_mod(smod, "score", n_sargs) if HAS_SMOD else _no_score_mod
    MMOD = device_mod(mmod, "mask", n_margs) if HAS_MMOD else _no_mask_mod

    @cuda.jit(device=True, inline=True)
    def whole_group(y):
        return y, 0

    @cuda.jit(device=True, inline=True)
    def head_chunk(y):
        return y // CHUNKS, y % CHUNKS

    HEAD_BLOCK = whole_group if CHUNKS == 1 else head_chunk  # blockIdx.y -> (kv head, chunk)
    ACC = numba.from_dtype(acc_dtype)
    CAST = numba.float64 if acc_dtype == np.float64 else numba.float32
    ZERO = acc_dtype.type(0.0)
    ONE = acc_dtype.type(1.0)
    NEG_INF = acc_dtype.type(-np.inf)
    ROWS = GROUP * BLOCK_Q
    RPW = -(-ROWS // NW)  # rows per warp
    QROWS = RPW * NW
    KPL = -(-BK // WARP)  # keys per lane
    VPL = -(-DV // WARP)  # output columns per lane
    NT = WARP * NW
    DP = D + 1  # padded K row: lanes reading different keys hit different banks
    PCOLS = KPL * WARP
    NACC = RPW * VPL
    NSC = RPW * KPL
    LOAD = bfm.loader(BF16, acc_dtype)  # stored element -> accumulator dtype
    STORE = bfm.storer(BF16)  # accumulator -> stored element
    Q0, K0, V0, P0, END = dynamic_layout(acc_dtype.itemsize, D, DV, GROUP, BLOCK_Q, BK, NW)

    if QUANT:
        DEQ = cq.dequantizer(QUANT)

        @cuda.jit(device=True, inline=True)
        def load_kv(x, xs, r, h, c):  # 8-bit storage times its (row, head) scale
            return DEQ(x[r, h, c]) * xs[r, h]
    else:
        @cuda.jit(device=True, inline=True)
        def load_kv(x, xs, r, h, c):
            return LOAD(x[r, h, c])

    if not DYN:  # one static buffer (krow apart): the same offsets as the dynamic one
        Q0, K0, V0, P0, END = 0, K0 - Q0, V0 - Q0, P0 - Q0, END - Q0

    @cuda.jit(device=True, inline=True)
    def static_tiles():
        buf = cuda.shared.array(END, ACC)
        ibuf = cuda.shared.array(BK, numba.int64)
        return buf, ibuf

    @cuda.jit(device=True, inline=True)
    def dynamic_tiles():
        buf = cuda.shared.array(0, ACC)  # both views start at the dynamic buffer: krow
        ibuf = cuda.shared.array(0, numba.int64)  # takes its first BK int64, tiles follow
        return buf, ibuf

    TILES = dynamic_tiles if DYN else static_tiles

    @cuda.jit
    def flash_forward(q, k, v, out, lse, part_out, part_lse, meta, items_off, block_table,
                      block_size, scale, causal, wl, wr, softcap, slopes, has_alibi, bias,
                      bstr, has_bias, mask, mstr, has_mask, sinks, has_sinks, sargs, margs,
                      bflags, bq, bk, k_scale, v_scale):
        sm, krow = TILES()  # tiles: q_s, k_s, v_s, p_s at Q0, K0, V0, P0 (row-major)
        acc = cuda.local.array(NACC, ACC)
        sc = cuda.local.array(NSC, ACC)
        m = cuda.local.array(RPW, ACC)
        l = cuda.local.array(RPW, ACC)

        it = cuda.blockIdx.x
        kvh, hc = HEAD_BLOCK(cuda.blockIdx.y)  # query heads kvh * GROUP_ALL + hc * GROUP + g
        split = cuda.blockIdx.z
        nsplit = cuda.gridDim.z
        tid = cuda.threadIdx.x
        lane = tid % WARP
        w = tid // WARP
        b = meta[items_off + 3 * it]
        i_first = meta[items_off + 3 * it + 1]
        q_start = meta[5 * b]
        k_start = meta[5 * b + 2]
        off = meta[5 * b + 4]
        i0 = i_first - q_start
        i1 = meta[items_off + 3 * it + 2] - q_start
        nq = i1 - i0
        nr = GROUP * nq
        lo, hi = key_range(i0, i1, off, meta[5 * b + 3], causal, wl, wr)
        js, je = split_range(lo, hi, nsplit, split, BK)
        bsl = b if slopes.shape[0] > 1 else 0

        for idx in range(tid, QROWS * D, NT):
            r = idx // D
            c = idx % D
            val = ZERO
            if r < nr:
                val = LOAD(q[i_first + r % nq, kvh * GROUP_ALL + hc * GROUP + r // nq, c]) * scale
            sm[Q0 + r * D + c] = val
        for rr in range(RPW):
            r = w * RPW + rr
            m[rr] = NEG_INF
            l[rr] = ZERO
            if has_sinks and split == 0 and r < nr:
                m[rr] = sinks[kvh * GROUP_ALL + hc * GROUP + r // nq]
                l[rr] = ONE
            for u in range(VPL):
                acc[rr * VPL + u] = ZERO

        for j0 in range(js, je, BK):
            nk = min(BK, je - j0)
            mm_on = HAS_MMOD
            if BLOCKS:  # block-uniform: every thread reads the same flags
                any_set = False
                all_full = True
                bb = b if bflags.shape[0] > 1 else 0
                for r in range(nr):
                    hb = 0
                    if bflags.shape[1] > 1:
                        hb = kvh * GROUP_ALL + hc * GROUP + r // nq
                    for kb in range(j0 // bk, (j0 + nk - 1) // bk + 1):
                        f = bflags[bb, hb, (i0 + r % nq) // bq, kb]
                        if f != 0:
                            any_set = True
                        if f != 2:
                            all_full = False
                if not any_set:
                    continue  # an empty tile for every row of the item
                mm_on = not all_full
            cuda.syncthreads()  # previous tile fully consumed (and q_s written)
            for jj in range(tid, nk, NT):
                j = j0 + jj
                krow[jj] = k_start + block_table[b, j // block_size] * block_size \
                    + j % block_size
            cuda.syncthreads()
            for idx in range(tid, nk * D, NT):
                jj = idx // D
                c = idx % D
                sm[K0 + jj * DP + c] = load_kv(k, k_scale, krow[jj], kvh, c)
            for idx in range(tid, nk * DV, NT):
                jj = idx // DV
                c = idx % DV
                sm[V0 + jj * DV + c] = load_kv(v, v_scale, krow[jj], kvh, c)
            cuda.syncthreads()
            positional = tile_needs_mask(i0, i1, j0, j0 + nk, off, causal, wl, wr)

            # scores of the lane's keys against every row of the warp
            for t in range(KPL):
                jj = lane + WARP * t
                for rr in range(RPW):
                    sc[rr * KPL + t] = ZERO
                if jj < nk:
                    for c in range(D):
                        kc = sm[K0 + jj * DP + c]
                        for rr in range(RPW):
                            sc[rr * KPL + t] += sm[Q0 + (w * RPW + rr) * D + c] * kc

            for rr in range(RPW):
                r = w * RPW + rr
                m_new = NEG_INF
                if r < nr:  # warp-uniform
                    g = r // nq
                    i = i0 + r % nq
                    h = kvh * GROUP_ALL + hc * GROUP + g
                    mx = NEG_INF
                    for t in range(KPL):
                        jj = lane + WARP * t
                        j = j0 + jj
                        s = sc[rr * KPL + t]
                        if jj >= nk:
                            s = NEG_INF
                        else:
                            if HAS_SMOD:
                                s = SMOD(s, b, h, i, j, sargs)
                            if softcap > 0:
                                s = softcap * math.tanh(s / softcap)
                            if has_alibi:
                                s -= slopes[bsl, h] * CAST(abs(i + off - j))
                            if has_bias:
                                s += bias[b * bstr[0] + h * bstr[1] + i * bstr[2]
                                          + j * bstr[3]]
                            if has_mask:
                                if not mask[b * mstr[0] + h * mstr[1] + i * mstr[2]
                                            + j * mstr[3]]:
                                    s = NEG_INF
                            if positional and not visible(i, j, off, causal, wl, wr):
                                s = NEG_INF
                            if HAS_MMOD:
                                if mm_on and not MMOD(b, h, i, j, margs):
                                    s = NEG_INF
                        sc[rr * KPL + t] = s
                        mx = max(mx, s)
                    mx = warp_max(mx)
                    m_new = max(m[rr], mx)
                if m_new == NEG_INF:  # no row, or nothing visible yet (warp-uniform)
                    for t in range(KPL):
                        sm[P0 + (w * RPW + rr) * PCOLS + lane + WARP * t] = ZERO
                    continue
                alpha = ZERO
                if m[rr] > NEG_INF:
                    alpha = math.exp(m[rr] - m_new)
                ps = ZERO
                for t in range(KPL):
                    s = sc[rr * KPL + t]
                    p = ZERO
                    if s > NEG_INF:
                        p = math.exp(s - m_new)
                    sm[P0 + (w * RPW + rr) * PCOLS + lane + WARP * t] = p
                    ps += p
                ps = warp_sum(ps)
                l[rr] = l[rr] * alpha + ps
                m[rr] = m_new
                for u in range(VPL):
                    acc[rr * VPL + u] *= alpha
            cuda.syncwarp(FULL_MASK)  # the warp's probabilities are in p_s
            for jj in range(nk):
                for u in range(VPL):
                    c = lane + WARP * u
                    if c < DV:
                        vc = sm[V0 + jj * DV + c]
                        for rr in range(RPW):
                            acc[rr * VPL + u] += sm[P0 + (w * RPW + rr) * PCOLS + jj] * vc

        for rr in range(RPW):
            r = w * RPW + rr
            if r >= nr:
                continue
            tq = i_first + r % nq
            h = kvh * GROUP_ALL + hc * GROUP + r // nq
            inv = ZERO
            lv = NEG_INF
            if l[rr] > 0:
                inv = ONE / l[rr]
                lv = m[rr] + math.log(l[rr])
            for u in range(VPL):
                c = lane + WARP * u
                if c < DV:
                    if nsplit == 1:
                        out[tq, h, c] = STORE(acc[rr * VPL + u] * inv)
                    else:
                        part_out[split, tq, h, c] = acc[rr * VPL + u] * inv
            if lane == 0:
                if nsplit == 1:
                    lse[tq, h] = lv
                else:
                    part_lse[split, tq, h] = lv

    return flash_forward


def _make_merge_splits(STORE):
    @cuda.jit
    def merge_splits(part_out, part_lse, out, lse):
        """out (Tq, H, Dv), lse (Tq, H) from nsplit partial results; one thread each."""
        nsplit, tq, n_heads, dv = part_out.shape
        e = cuda.grid(1)
        if e >= tq * n_heads * dv:
            return
        c = e % dv
        h = (e // dv) % n_heads
        t = e // (dv * n_heads)
        mx = part_lse[0, t, h]
        for s in range(1, nsplit):
            mx = max(mx, part_lse[s, t, h])
        if mx == -math.inf:
            out[t, h, c] = 0
            if c == 0:
                lse[t, h] = mx
            return
        tot = mx - mx  # a zero of lse's type (mx is finite here)
        val = tot
        for s in range(nsplit):
            wgt = math.exp(part_lse[s, t, h] - mx)
            tot += wgt
            if wgt > 0:
                val += wgt * part_out[s, t, h, c]
        out[t, h, c] = STORE(val / tot)
        if c == 0:
            lse[t, h] = mx + math.log(tot)

    return merge_splits


merge_splits = _make_merge_splits(bfm.storer(False))
merge_splits_bf16 = _make_merge_splits(bfm.storer(True))  # out as bfloat16 bits


def _make_merge_states(LOAD, STORE):
    @cuda.jit
    def merge_states(out_a, lse_a, out_b, lse_b, out, lse):
        """out (N, S, H, Dv), lse (N, H, S): merge two partial states; one thread each."""
        n, sq, n_heads, dv = out_a.shape
        e = cuda.grid(1)
        if e >= n * sq * n_heads * dv:
            return
        c = e % dv
        h = (e // dv) % n_heads
        i = (e // (dv * n_heads)) % sq
        bi = e // (dv * n_heads * sq)
        la = lse_a[bi, h, i]
        lb = lse_b[bi, h, i]
        mx = max(la, lb)
        if mx == -math.inf:
            out[bi, i, h, c] = 0
            if c == 0:
                lse[bi, h, i] = mx
            return
        wa = math.exp(la - mx)
        wb = math.exp(lb - mx)
        tot = wa + wb
        out[bi, i, h, c] = STORE((wa * LOAD(out_a[bi, i, h, c])
                                  + wb * LOAD(out_b[bi, i, h, c])) / tot)
        if c == 0:
            lse[bi, h, i] = mx + math.log(tot)

    return merge_states


merge_states = _make_merge_states(bfm.storer(False), bfm.storer(False))  # identities
merge_states_bf16 = _make_merge_states(bfm.load, bfm.store)  # outputs as bfloat16 bits


@cuda.jit
def copy_cast(src, dst):
    """dst[...] = src[...] for 4-D arrays of one shape (any strides, any float dtypes)."""
    n0, n1, n2, n3 = dst.shape
    e = cuda.grid(1)
    if e >= n0 * n1 * n2 * n3:
        return
    a3 = e % n3
    a2 = (e // n3) % n2
    a1 = (e // (n3 * n2)) % n1
    a0 = e // (n3 * n2 * n1)
    dst[a0, a1, a2, a3] = src[a0, a1, a2, a3]


@cuda.jit
def copy_cast3(src, dst):
    """dst[...] = src[...] for 3-D arrays of one shape."""
    n0, n1, n2 = dst.shape
    e = cuda.grid(1)
    if e >= n0 * n1 * n2:
        return
    dst[e // (n2 * n1), (e // n2) % n1, e % n2] = src[e // (n2 * n1), (e // n2) % n1, e % n2]


@cuda.jit
def copy_cast2(src, dst):
    """dst[...] = src[...] for 2-D arrays of one shape."""
    n0, n1 = dst.shape
    e = cuda.grid(1)
    if e >= n0 * n1:
        return
    dst[e // n1, e % n1] = src[e // n1, e % n1]


COPY_KERNELS = {2: copy_cast2, 3: copy_cast3, 4: copy_cast}


@cuda.jit
def swap_last(src, dst):
    """dst (B, H, S) = src (B, S, H) transposed (lse layouts)."""
    nb, ns, nh = src.shape
    e = cuda.grid(1)
    if e >= nb * ns * nh:
        return
    hh = e % nh
    s = (e // nh) % ns
    bb = e // (nh * ns)
    dst[bb, hh, s] = src[bb, s, hh]
