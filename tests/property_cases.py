"""Property cases: configurations drawn from the whole option space, each operation
(forward, backward, varlen, varlen_backward, kvcache, backward_mods) checked against
numba_attn.reference; the layer backward (layer_backward) against central finite differences
of its own forward in float64 along random directions.

Run as a child process by tests/test_properties.py (so a crash is a reported failing
example, not a dead suite)::

    python tests/property_cases.py OPERATION --examples N [--seed S]

Before each example the child prints ``CASE <json>`` (flushed); a failing example ends
the run with ``FAIL <json>`` and the errors, a crash leaves the last CASE line as the
configuration that killed it. ``python tests/property_cases.py OPERATION --case JSON``
reruns one configuration.

Tolerances follow the twice-naive-error rule: a result may be off from the float64 oracle
by at most twice what the same dense algorithm computed naively in the storage dtype is
off (the reference evaluated with its arrays kept in the compute dtype: float32 for half
storage), plus a few roundings of the reduction length, normwise per output.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import traceback

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

import numba_attn as na
from numba_attn import reference as ref

# Lengths: tiny, tile edges (block rows 8, key tiles 64, query tiles 64) and a little more.
_EDGES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129]
_HEAD_DIMS = [8, 16, 24, 32, 40, 64, 80, 96, 128]
# bias / mask broadcast forms, as (batch, heads, q, k) flags: 1 = broadcast axis.
_BCAST = ["bhqk", "1hqk", "b1qk", "11qk", "bh1k", "111k", "hqk", "qk"]


def _length(allow_zero=True):
    opts = [st.sampled_from(_EDGES), st.integers(1, 160)]
    if allow_zero:
        opts.append(st.just(0))
    return st.one_of(*opts)


@st.composite
def batched_config(draw, *, backward=False):
    """One configuration of attention / attention_backward (JSON-serialisable)."""
    hkv = draw(st.sampled_from([1, 1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    sq = draw(_length(allow_zero=True))
    sk = draw(_length(allow_zero=True))
    d = draw(st.sampled_from(_HEAD_DIMS))
    cfg = dict(
        B=draw(st.integers(1, 3)), Sq=sq, Sk=sk, H=hkv * group, Hkv=hkv, D=d,
        Dv=draw(st.sampled_from([d, d, d, 16, 48])),
        dtype=draw(st.sampled_from(["float32", "float64"] * 2 + ["float16", "bfloat16"])),
        causal=draw(st.sampled_from([False, True, "top_left"])),
        window=draw(st.sampled_from([(-1, -1), (-1, -1), (0, 0), (4, 0), (-1, 3), (17, 5),
                                     (70, -1)])),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.5, 30.0])),
        scale=draw(st.sampled_from([None, None, 0.3])),
        alibi=draw(st.sampled_from([None, None, "h", "bh"])),
        bias=draw(st.sampled_from([None, None] + _BCAST)),
        mask=draw(st.sampled_from([None, None, None] + _BCAST)),
        kv_lens=draw(st.booleans()) and sk > 0,
        sinks=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if backward:
        cfg["dropout_p"] = draw(st.sampled_from([0.0, 0.0, 0.0, 0.2]))
    # query alignment: padded queries (q_lens) or an explicit q_offset
    cfg["q_align"] = draw(st.sampled_from([None, None, "q_lens", "q_offset"]))
    cfg["q_offset"] = draw(st.integers(-sq - 2, sk + 2))
    return cfg


def _bcast_shape(form, b, h, sq, sk):
    """The array shape of a broadcast form: "hqk" is 3-D (h, q, k), "qk" 2-D."""
    full = dict(b=b, h=h, q=sq, k=sk)
    return tuple(1 if c == "1" else full[c] for c in form)


def _options(cfg, rng, dt, b, h, sq, sk, kv_lens):
    """Keyword options of a configuration, drawn from ``rng`` in a fixed order; bias and
    mask over (b, h, sq, sk); ``kv_lens()`` draws the key lengths when asked for."""
    kw = dict(causal=cfg["causal"], window=tuple(cfg["window"]), softcap=cfg["softcap"],
              scale=cfg["scale"])
    if cfg["alibi"] == "h":
        kw["alibi_slopes"] = rng.uniform(0.01, 0.5, h)
    elif cfg["alibi"] == "bh":
        kw["alibi_slopes"] = rng.uniform(0.01, 0.5, (b, h))
    if cfg["bias"]:
        kw["bias"] = rng.standard_normal(_bcast_shape(cfg["bias"], b, h, sq, sk)).astype(
            np.float32 if dt.itemsize == 2 else dt)
    if cfg["mask"]:
        kw["mask"] = rng.random(_bcast_shape(cfg["mask"], b, h, sq, sk)) > 0.25
    if cfg["kv_lens"]:
        kw["kv_lens"] = kv_lens()
    if cfg["sinks"]:
        kw["sinks"] = rng.standard_normal(h)
    if cfg.get("dropout_p"):
        kw["dropout_p"] = cfg["dropout_p"]
        kw["seed"] = int(cfg["seed"]) % 1000
    return kw


def build(cfg):
    """Arrays and keyword options of a batched configuration."""
    rng = np.random.default_rng(cfg["seed"])
    dt = _storage_dtype(cfg["dtype"])
    b, sq, sk, h, hkv = cfg["B"], cfg["Sq"], cfg["Sk"], cfg["H"], cfg["Hkv"]
    q = rng.standard_normal((b, sq, h, cfg["D"])).astype(dt)
    k = rng.standard_normal((b, sk, hkv, cfg["D"])).astype(dt)
    v = rng.standard_normal((b, sk, hkv, cfg["Dv"])).astype(dt)
    def kv_lens():
        if isinstance(cfg["kv_lens"], list):  # explicit lengths (regression cases)
            return np.array(cfg["kv_lens"], np.int32)
        return rng.integers(0, sk + 1, b).astype(np.int32)

    kw = _options(cfg, rng, dt, b, h, sq, sk, kv_lens)
    if cfg.get("q_align") == "q_lens":
        kw["q_lens"] = rng.integers(0, sq + 1, b).astype(np.int32)
    elif cfg.get("q_align") == "q_offset":
        kw["q_offset"] = cfg["q_offset"]
    return q, k, v, kw, rng


@contextlib.contextmanager
def naive_in(dtype):
    """The reference evaluated with its arrays kept in ``dtype``: the naive dense
    algorithm in the storage precision (whose error sets the tolerance)."""
    saved = ref._f64
    if np.dtype(dtype).itemsize == 2:  # half storage computes in float32
        dtype = np.float32
    ref._f64 = lambda x: None if x is None else np.asarray(x, dtype=dtype)
    try:
        yield
    finally:
        ref._f64 = saved


def compare(name, got, exact, naive, dtype, length, scale=0.0):
    """Error message, or None when got is within the twice-naive-error rule.

    ``scale``: a magnitude the floor uses when the result's own is smaller (a gradient that
    cancels to ~0 still carries the rounding of terms as large as its siblings')."""
    got = np.asarray(got, np.float64)
    exact = np.asarray(exact, np.float64)
    naive = np.asarray(naive, np.float64)
    if got.shape != exact.shape:
        return f"{name}: shape {got.shape}, expected {exact.shape}"
    inf = np.isneginf(exact)
    if not np.array_equal(np.isneginf(got), inf):
        return f"{name}: -inf at {np.argwhere(np.isneginf(got) != inf)[:4].tolist()}"
    if not np.isfinite(got[~inf]).all():
        return f"{name}: non-finite at {np.argwhere(~np.isfinite(got) & ~inf)[:4].tolist()}"
    if got.size == 0:
        return None
    fin = ~inf & ~np.isneginf(naive)
    err = float(np.abs(got[fin] - exact[fin]).max(initial=0.0))
    nerr = float(np.abs(naive[fin] - exact[fin]).max(initial=0.0))
    mag = max(float(np.abs(exact)[fin].max(initial=0.0)), scale)
    # floor: a few roundings of a length-``length`` reduction; linear in float64, where
    # the naive error (the oracle's own precision) is 0 and cannot speak, sqrt otherwise
    grow = length if np.dtype(dtype) == np.float64 else math.sqrt(length)
    tol = 2.0 * nerr + 4 * grow * _eps(dtype) * max(mag, 1.0)
    if err > tol:
        return f"{name}: max error {err:.3g} > {tol:.3g} (naive {nerr:.3g}, |x| {mag:.3g})"
    return None


def _errors(names, got, exact, naive, dtype, cfg):
    if "lens_q" in cfg:
        length = sum(cfg["lens_q"]) + sum(cfg["lens_k"])
    else:
        length = cfg["B"] * (cfg["Sq"] + cfg["Sk"])
    length += cfg["D"] + cfg["Dv"]
    scale = 0.0
    if names[0] == "dq":  # gradients: dq, dk, dv share their terms' scale
        scale = max(float(np.abs(np.nan_to_num(x, neginf=0.0)).max(initial=0.0))
                    for x in exact[:3])
    out = []
    for n, g, e, v in zip(names, got, exact, naive):
        if e is None:
            continue
        msg = compare(n, g, e, v, dtype, length, scale)
        if msg:
            out.append(msg)
    return out


def check_forward(cfg):
    q, k, v, kw, _ = build(cfg)
    dt = q.dtype
    got = na.attention(q, k, v, return_lse=True, **kw)
    exact = ref.attention(q, k, v, return_lse=True, **kw)
    naive = _naive(dt, ref.attention, q, k, v, return_lse=True, **kw)
    return _errors(["out", "lse"], got, exact, naive, dt, cfg)


def check_backward(cfg):
    q, k, v, kw, rng = build(cfg)
    dt = q.dtype
    out, lse = na.attention(q, k, v, return_lse=True, **kw)
    # the forward first (with dropout, its own kernel): then its out/lse feed the backward
    errs = _errors(["out", "lse"], (out, lse), ref.attention(q, k, v, return_lse=True, **kw),
                   _naive(dt, ref.attention, q, k, v, return_lse=True, **kw), dt, cfg)
    dout = rng.standard_normal(out.shape).astype(dt)
    flags = dict(return_dbias="bias" in kw, return_dsinks="sinks" in kw)
    got = na.attention_backward(dout, q, k, v, out, lse, **kw, **flags)
    got = _pad_grads(got, flags)
    exact = ref.attention_backward(dout, q, k, v, out, lse, **kw)
    naive = _naive(dt, ref.attention_backward, dout, q, k, v, out, lse, **kw)
    return errs + _errors(["dq", "dk", "dv", "dbias", "dsinks"], got, exact, naive, dt, cfg)


def _naive(dt, fn, *args, **kw):
    with naive_in(dt):
        return fn(*args, **kw)


def _pad_grads(got, flags):
    got = list(got)
    dq, dk, dv = got[:3]
    rest = got[3:]
    dbias = rest.pop(0) if flags["return_dbias"] else None
    dsinks = rest.pop(0) if flags["return_dsinks"] else None
    return dq, dk, dv, dbias, dsinks


@st.composite
def varlen_config(draw, *, backward=False):
    base = draw(batched_config(backward=backward))
    n = draw(st.integers(1, 4))
    base["lens_q"] = [draw(_length()) for _ in range(n)]
    base["lens_k"] = [draw(_length()) for _ in range(n)]
    base["B"] = n
    # varlen rows carry their own lengths; an explicit q_offset aligns every row alike
    base["q_align"] = draw(st.sampled_from([None, None, "q_offset"]))
    base["q_offset"] = draw(st.integers(-max(base["lens_q"]) - 2, max(base["lens_k"]) + 2))
    # varlen bias/mask take (batch|1, heads|1, max_q|1, max_k|1) forms
    base["bias"] = base["bias"] if base["bias"] and len(base["bias"]) == 4 else None
    base["mask"] = base["mask"] if base["mask"] and len(base["mask"]) == 4 else None
    return base


def build_varlen(cfg):
    rng = np.random.default_rng(cfg["seed"])
    dt = _storage_dtype(cfg["dtype"])
    lq, lk = cfg["lens_q"], cfg["lens_k"]
    b, h, hkv = len(lq), cfg["H"], cfg["Hkv"]
    cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], h, cfg["D"])).astype(dt)
    k = rng.standard_normal((cu_k[-1], hkv, cfg["D"])).astype(dt)
    v = rng.standard_normal((cu_k[-1], hkv, cfg["Dv"])).astype(dt)
    mq, mk = max(lq), max(lk)
    kw = _options(cfg, rng, dt, b, h, mq, mk,
                  lambda: np.array([rng.integers(0, x + 1) for x in lk], np.int32))
    if cfg.get("q_align") == "q_offset":
        kw["q_offset"] = cfg["q_offset"]
    return q, k, v, cu_q, cu_k, kw, rng


def check_varlen(cfg):
    q, k, v, cu_q, cu_k, kw, _ = build_varlen(cfg)
    dt = q.dtype
    got = na.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    exact = ref.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    with naive_in(dt):
        naive = ref.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    return _errors(["out", "lse"], got, exact, naive, dt, cfg)


def check_varlen_backward(cfg):
    q, k, v, cu_q, cu_k, kw, rng = build_varlen(cfg)
    dt = q.dtype
    out, lse = na.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dt)
    flags = dict(return_dbias="bias" in kw, return_dsinks="sinks" in kw)
    got = na.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kw, **flags)
    got = _pad_grads(got, flags)
    exact = ref.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    with naive_in(dt):
        naive = ref.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    return _errors(["dq", "dk", "dv", "dbias", "dsinks"], got, exact, naive, dt, cfg)


@st.composite
def kvcache_config(draw):
    """attention_with_kvcache over a filled cache (contiguous or paged, any block size),
    appending ``n_new`` tokens (0: attend only); long rows reach the split-KV decode."""
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    b = draw(st.integers(1, 3))
    d = draw(st.sampled_from([8, 16, 32, 64, 80, 128]))
    n_new = draw(st.sampled_from([0, 1, 1, 1, 2, 7, 33]))
    long = st.sampled_from([600, 1100, 2100])
    lens = [draw(st.one_of(_length(), long)) for _ in range(b)]
    return dict(
        B=b, H=hkv * group, Hkv=hkv, D=d, Dv=draw(st.sampled_from([d, d, 16])),
        lens=lens, n_new=n_new, Sq=n_new if n_new else draw(st.sampled_from([1, 1, 2, 5])),
        cache_dtype=draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"])),
        kind=draw(st.sampled_from(["contiguous", "paged"])),
        block_size=draw(st.sampled_from([1, 3, 5, 16, 64])),
        causal=draw(st.sampled_from([False, True, True, "top_left"])),
        window=draw(st.sampled_from([(-1, -1), (-1, -1), (4, 0), (300, -1), (40, 3)])),
        softcap=draw(st.sampled_from([0.0, 0.0, 2.0])),
        scale=draw(st.sampled_from([None, None, 0.7])),
        alibi=draw(st.sampled_from([None, None, "h", "bh"])),
        bias=draw(st.sampled_from([None, None, None, "b1qk", "bhqk"])),
        mask=draw(st.sampled_from([None, None, None, "bhqk", "11qk"])),
        sinks=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _eps(dtype):
    if np.dtype(dtype).itemsize == 2:  # float16 / bfloat16 (ml_dtypes): finfo by name
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def _storage_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_kvcache(cfg):
    rng = np.random.default_rng(cfg["seed"])
    cdt = _storage_dtype(cfg["cache_dtype"])
    qdt = np.dtype(np.float64 if cfg["cache_dtype"] == "float64" else np.float32)
    b, h, hkv, d, dv = cfg["B"], cfg["H"], cfg["Hkv"], cfg["D"], cfg["Dv"]
    lens, n, sq = np.array(cfg["lens"]), cfg["n_new"], cfg["Sq"]
    cap = int(lens.max()) + n + 1
    if cfg["kind"] == "contiguous":
        cache = na.KVCache(b, cap, hkv, d, dtype=cdt, head_dim_v=dv)
    else:
        bs = cfg["block_size"]
        cache = na.PagedKVCache(b, b * -(-cap // bs) + 1, bs, hkv, d, dtype=cdt,
                                max_seqlen=cap, head_dim_v=dv)
    kp = rng.standard_normal((b, int(lens.max()), hkv, d)).astype(cdt)
    vp = rng.standard_normal((b, int(lens.max()), hkv, dv)).astype(cdt)
    cache.append(kp, vp)
    cache.seqlens = lens
    q = rng.standard_normal((b, sq, h, d)).astype(qdt)
    kn = rng.standard_normal((b, n, hkv, d)).astype(cdt) if n else None
    vn = rng.standard_normal((b, n, hkv, dv)).astype(cdt) if n else None
    sk = int(lens.max()) + n
    kw = dict(causal=cfg["causal"], window=tuple(cfg["window"]), softcap=cfg["softcap"],
              scale=cfg["scale"])
    if cfg["alibi"] == "h":
        kw["alibi_slopes"] = rng.uniform(0.01, 0.5, h)
    elif cfg["alibi"] == "bh":
        kw["alibi_slopes"] = rng.uniform(0.01, 0.5, (b, h))
    if cfg["bias"]:
        kw["bias"] = rng.standard_normal(_bcast_shape(cfg["bias"], b, h, sq, sk))
    if cfg["mask"]:
        kw["mask"] = rng.random(_bcast_shape(cfg["mask"], b, h, sq, sk)) > 0.25
    if cfg["sinks"]:
        kw["sinks"] = rng.standard_normal(h)
    got = na.attention_with_kvcache(q, cache, kn, vn, return_lse=True, **kw)
    errs = []
    if cache.seqlens.tolist() != (lens + n).tolist():
        errs.append(f"seqlens {cache.seqlens.tolist()}, expected {(lens + n).tolist()}")
    # expected: each row on its own, over its prior keys and the new ones
    exact = (np.zeros((b, sq, h, dv)), np.zeros((b, h, sq)))
    naive = (np.zeros((b, sq, h, dv)), np.zeros((b, h, sq)))
    for r in range(b):
        L = int(lens[r]) + n
        kk = np.concatenate([kp[r, :lens[r]]] + ([kn[r]] if n else []))[None]
        vv = np.concatenate([vp[r, :lens[r]]] + ([vn[r]] if n else []))[None]
        rkw = dict(kw)
        if "alibi_slopes" in kw and kw["alibi_slopes"].ndim == 2:
            rkw["alibi_slopes"] = kw["alibi_slopes"][r]
        for name in ("bias", "mask"):
            if name in kw:
                x = kw[name]
                rkw[name] = x[r if x.shape[0] > 1 else 0][None][..., :L]
        for dest, ctx in ((exact, contextlib.nullcontext()), (naive, naive_in(qdt))):
            with ctx:
                o, lse = ref.attention(q[r:r + 1], kk, vv, return_lse=True, **rkw)
            dest[0][r], dest[1][r] = o[0], lse[0]
    length = int(lens.max()) + n + d + dv
    for name, g, e, v in zip(["out", "lse"], got, exact, naive):
        msg = compare(name, g, e, v, qdt, length)
        if msg:
            errs.append(msg)
    return errs


# ---------------------------------------------------------------------------------------
# user mods through the forward and the backward: a fixed set of functions (the kernels are
# specialised on them, so a few compiles serve every example), runtime options drawn
# ---------------------------------------------------------------------------------------
def mod_rel_tanh(score, b, h, i, j, table):
    """A soft-capped score plus a clipped relative-position table: automatic derivative."""
    return 8.0 * np.tanh(score / 8.0) + table[h, min(max(j - i, -4), 4) + 4]


def mod_leaky(score, b, h, i, j, slope):
    """A branch on the score (no complex step): needs its explicit derivative."""
    return score if score > 0 else slope * score


def mod_leaky_grad(score, b, h, i, j, slope):
    return 1.0 if score > 0 else slope


def mask_prefix(b, h, i, j, prefix):
    """Prefix-LM: bidirectional over each row's first prefix[b] keys, causal after."""
    return j <= i or j < prefix[b]


@st.composite
def mods_config(draw):
    """A backward configuration with mods; lengths kept small (the oracle evaluates the
    Python mods element by element) and float32/float64 storage (one compile each)."""
    cfg = draw(batched_config(backward=True))
    small = st.one_of(st.sampled_from([0, 1, 2, 7, 8, 9, 16, 17, 33]), st.integers(1, 40))
    cfg.update(B=draw(st.integers(1, 2)), Sq=draw(small), Sk=draw(small),
               dtype=draw(st.sampled_from(["float32", "float64"])),
               mods=draw(st.sampled_from(["score", "mask", "both", "block", "grad"])))
    cfg["Hkv"] = min(cfg["Hkv"], 2)
    cfg["H"] = cfg["Hkv"] * draw(st.sampled_from([1, 2]))
    cfg["q_offset"] = draw(st.integers(-cfg["Sq"] - 2, cfg["Sk"] + 2))
    return cfg


def build_mods(cfg):
    """(q, k, v, keywords for numba_attn, keywords for the reference, rng)."""
    q, k, v, kw, rng = build(cfg)
    b, h, sq, sk = cfg["B"], cfg["H"], cfg["Sq"], cfg["Sk"]
    table = rng.standard_normal((h, 9))
    prefix = rng.integers(0, sk + 1, b)
    kind = cfg["mods"]
    mods = {}
    if kind in ("score", "both", "block"):
        mods.update(score_mod=mod_rel_tanh, score_mod_args=(table,))
    if kind == "grad":
        mods.update(score_mod=mod_leaky, score_mod_args=(0.1,), score_mod_grad=mod_leaky_grad)
    if kind in ("mask", "both") or (kind == "block" and not (sq and sk)):
        mods.update(mask_mod=mask_prefix, mask_mod_args=(prefix,))
    ref_mods = dict(mods)
    if kind == "block" and sq and sk:
        mods["block_mask"] = na.create_block_mask(mask_prefix, b, 1, sq, sk,
                                                  mask_mod_args=(prefix,), block_size=8)
        ref_mods.update(mask_mod=mask_prefix, mask_mod_args=(prefix,))
    return q, k, v, {**kw, **mods}, {**kw, **ref_mods}, rng


def check_backward_mods(cfg):
    q, k, v, kw, rkw, rng = build_mods(cfg)
    dt = q.dtype
    fwd = {n: x for n, x in kw.items() if n != "score_mod_grad"}
    rfwd = {n: x for n, x in rkw.items() if n != "score_mod_grad"}
    errs = _errors(["out", "lse"], na.attention(q, k, v, return_lse=True, **fwd),
                   ref.attention(q, k, v, return_lse=True, **rfwd),
                   _naive(dt, ref.attention, q, k, v, return_lse=True, **rfwd), dt, cfg)
    flags = dict(return_dbias="bias" in kw, return_dsinks="sinks" in kw)
    out, vjp = na.attention_vjp(q, k, v, **flags, **kw)
    dout = rng.standard_normal(out.shape).astype(dt)
    got = _pad_grads(vjp(dout), flags)
    o, lse = na.attention(q, k, v, return_lse=True, **fwd)
    exact = ref.attention_backward(dout, q, k, v, o, lse, **rkw)
    naive = _naive(dt, ref.attention_backward, dout, q, k, v, o, lse, **rkw)
    return errs + _errors(["dq", "dk", "dv", "dbias", "dsinks"], got, exact, naive, dt, cfg)


# ---------------------------------------------------------------------------------------
# layer backward: MultiHeadAttention.backward against finite differences of its forward
# ---------------------------------------------------------------------------------------
@st.composite
def layer_config(draw):
    hkv = draw(st.sampled_from([1, 2]))
    h = hkv * draw(st.sampled_from([1, 2, 3]))
    rope = draw(st.sampled_from([None, "full", "partial", "interleaved"]))
    # rotary needs an even head_dim, partial rotary (half of it) one divisible by 4
    d = draw(st.sampled_from([4, 8] if rope == "partial" else [2, 4, 6, 8]))
    return dict(
        B=draw(st.integers(1, 2)), S=draw(st.sampled_from([1, 2, 5, 9, 17])), H=h, Hkv=hkv,
        D=d, hidden=draw(st.sampled_from([4, 8, 12])),
        qkv_bias=draw(st.booleans()), out_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        rope=rope, causal=draw(st.booleans()), window=draw(st.sampled_from([None, None, 1, 4])),
        softcap=draw(st.sampled_from([0.0, 0.0, 3.0])),
        lora=draw(st.sampled_from([(), ("q",), ("v", "o"), ("q", "k", "v", "o")])),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.25])),
        pad=draw(st.sampled_from([None, None, "kv_lens", "mask"])),
        cross=draw(st.sampled_from([0, 0, 0, 3, 8])),  # cross-attention: context length
        seed=draw(st.integers(0, 2**31 - 1)))


def check_layer_backward(cfg):
    rng = np.random.default_rng(cfg["seed"])
    rope = cfg["rope"]
    layer = na.MultiHeadAttention(
        cfg["hidden"], cfg["H"], cfg["Hkv"], cfg["D"], qkv_bias=cfg["qkv_bias"],
        out_bias=cfg["out_bias"], qk_norm=cfg["qk_norm"],
        rope_theta=None if rope is None else 1e4,
        partial_rotary_factor=0.5 if rope == "partial" else 1.0,
        rotary_interleaved=rope == "interleaved", causal=cfg["causal"],
        sliding_window=cfg["window"], softcap=cfg["softcap"], dtype=np.float64,
        seed=cfg["seed"] % 1000)
    b, sq, e = cfg["B"], cfg["S"], cfg["hidden"]
    hd = cfg["H"] * cfg["D"]
    x = rng.standard_normal((b, sq, e))
    kw = {}
    sk = sq
    if cfg["cross"]:
        sk = cfg["cross"]
        kw["context"] = rng.standard_normal((b, sk, e))
    if cfg["pad"] == "kv_lens":
        kw["kv_lens"] = rng.integers(0, sk + 1, b)
    elif cfg["pad"] == "mask":
        kw["mask"] = rng.random((b, 1, sq, sk)) > 0.3
    dims = {"q": (e, hd), "k": (e, cfg["Hkv"] * cfg["D"]), "v": (e, cfg["Hkv"] * cfg["D"]),
            "o": (hd, e)}
    if cfg["lora"]:
        kw["lora"] = {t: (rng.standard_normal((2, dims[t][0])),
                          rng.standard_normal((dims[t][1], 2))) for t in cfg["lora"]}
        kw["lora_scale"] = 0.5
    if cfg["dropout_p"]:
        kw.update(dropout_p=cfg["dropout_p"], seed=cfg["seed"] % 977)
    y = layer.forward(x, train=True, **kw)
    dy = rng.standard_normal(y.shape)
    res = layer.backward(dy)
    if cfg["cross"]:
        dx, dctx, grads = res
    else:
        (dx, grads), dctx = res, None

    def loss():
        return float(np.sum(layer.forward(x, train=True, **kw) * dy))

    targets = [("dx", x, dx)]
    if dctx is not None:
        targets.append(("dcontext", kw["context"], dctx))
    params = dict(layer.named_parameters())
    for name, g in grads.items():
        if name.startswith("lora."):
            _, t, m = name.split(".")
            targets.append((name, kw["lora"][t][0 if m == "A" else 1], g))
        else:
            targets.append((name, params[name], g))
    errs = []
    if set(grads) != set(params) | {f"lora.{t}.{m}" for t in cfg["lora"] for m in "AB"}:
        errs.append(f"grads: keys {sorted(grads)}, parameters {sorted(params)}")
    eps = 1e-5
    for name, arr, g in targets:
        if np.shape(g) != arr.shape:
            errs.append(f"{name}: shape {np.shape(g)}, expected {arr.shape}")
            continue
        u = rng.standard_normal(arr.shape)
        arr += eps * u
        up = loss()
        arr -= 2 * eps * u
        dn = loss()
        arr += eps * u
        fd = (up - dn) / (2 * eps)
        got = float(np.sum(g * u))
        tol = 1e-6 * float(np.sum(np.abs(g * u))) + 1e-8 * (1.0 + abs(up) + abs(dn))
        if not abs(fd - got) <= tol:
            errs.append(f"{name}: <grad, u> = {got:.10g}, finite difference {fd:.10g}")
    return errs


OPERATIONS = {
    "forward": (batched_config(), check_forward),
    "backward": (batched_config(backward=True), check_backward),
    "varlen": (varlen_config(), check_varlen),
    "varlen_backward": (varlen_config(backward=True), check_varlen_backward),
    "kvcache": (kvcache_config(), check_kvcache),
    "backward_mods": (mods_config(), check_backward_mods),
    "layer_backward": (layer_config(), check_layer_backward),
}


def run_case(op, cfg):
    try:
        return OPERATIONS[op][1](cfg)
    except Exception:  # an exception on a valid configuration is a failure too
        return ["raised: " + traceback.format_exc(limit=4)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("operation", choices=sorted(OPERATIONS))
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (runs are derandomised)")
    p.add_argument("--case", action="append",
                   help="run this configuration (JSON) instead of drawing; repeatable")
    p.add_argument("--keep-going", action="store_true",
                   help="report every failing example instead of stopping at the first")
    a = p.parse_args(argv)
    if a.case:
        bad = 0
        for text in a.case:
            print("CASE", text, flush=True)
            errs = run_case(a.operation, json.loads(text))
            print("\n".join(["FAIL " + text] + ["    " + e for e in errs]) if errs else "ok",
                  flush=True)
            bad += bool(errs)
        return 1 if bad else 0
    strategy, _ = OPERATIONS[a.operation]
    failures = []

    @settings(max_examples=a.examples, deadline=None, database=None,
              derandomize=not a.seed,  # --seed S: another deterministic draw
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(cfg):
        line = json.dumps(cfg, sort_keys=True)
        print("CASE", line, flush=True)
        errs = run_case(a.operation, cfg)
        if errs:
            print("FAIL", line, flush=True)
            for e in errs:
                print("   ", e, flush=True)
            failures.append(line)
            if not a.keep_going:
                raise AssertionError("failing example")

    if a.seed:
        prop = hyp_seed(a.seed)(prop)
    try:
        prop()
    except AssertionError:
        pass
    print(f"DONE {a.operation}: {len(failures)} failing", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())


def spawn(operation, *args, timeout=900):
    """Run this module in a child process; (returncode, stdout + stderr).

    A negative return code is a signal (the child crashed): the last ``CASE`` line of the
    output is the configuration it died on."""
    import os
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), operation, *map(str, args)]
    # the child imports the numba_attn this process imported (a worktree's, not whichever
    # one is installed: the script's own folder, tests/, comes first on its path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(na.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return r.returncode, r.stdout + r.stderr


def report(rc, text, tail=40):
    """A failure message: the failing (or last started) cases and the output's tail."""
    lines = text.splitlines()
    cases = [ln for ln in lines if ln.startswith("CASE ")]
    keep = [ln for ln in lines if not ln.startswith("CASE ")]
    head = f"child exited with {rc}"
    if rc < 0 and cases:
        head += f" (signal {-rc}) while running:\n  {cases[-1]}"
    return head + "\n" + "\n".join(keep[-tail:])
