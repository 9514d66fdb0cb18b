"""Attention over Dask arrays: batch, head and key-split (context) parallelism.

:func:`attention` takes ``dask.array`` inputs in the BSHD layout of
:func:`numba_attn.attention`, chunked along batch, sequence and head axes, and builds one
task per visible (batch, head, query, key) chunk block: ``numba_attn.attention(...,
return_lse=True)`` on the numpy blocks, with the block's global alignment passed as
``q_offset``. The partial results of a query block are combined over its key blocks with
:func:`numba_attn.merge_states` in a tree (``split_every`` parts per task). Blocks that no
query of the block can see (causal, window, ``kv_lens``) get no task at all.

Needs the optional extra: ``pip install "numba_attn[distributed]"``.
"""
from __future__ import annotations

import functools
import operator

import numpy as np

try:
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
except ImportError as e:  # pragma: no cover - exercised by a test that hides dask
    raise ImportError(
        "numba_attn.distributed needs Dask: pip install 'numba_attn[distributed]' "
        f"(dask[array,distributed]); importing it failed with: {e}") from e

from . import dispatch as dp
from .config import AttentionConfig, AttentionError
from .functional import attention as _attention
from .functional import check_offset
from .functional import merge_states as _merge_states
from .masking import CAUSAL_CODES, key_range

__all__ = ["attention"]


def attention(q, k, v, *, causal=False, window=(-1, -1), scale=None, softcap=0.0,
              alibi_slopes=None, bias=None, mask=None, kv_lens=None, sinks=None,
              return_lse=False, backend="auto", q_offset=None, split_every=4):
    """:func:`numba_attn.attention` over Dask arrays, lazily, one task per visible chunk block.

    Parameters
    ----------
    q : dask array (batch, seqlen_q, num_heads, head_dim)
    k : dask array (batch, seqlen_k, num_kv_heads, head_dim)
    v : dask array (batch, seqlen_k, num_kv_heads, head_dim_v)
        Chunked as you like along batch, sequence and head axes (other arrays go through
        ``da.asarray``). Only what must be is rechunked: head_dim into one chunk; k and v to q's
        batch chunks and to q's head chunks divided by the group size; q's head chunks to
        whole GQA groups (a chunk boundary inside a group moves down to the group's start);
        v to k's sequence chunks.
    causal, window, scale, softcap, alibi_slopes, kv_lens, sinks, q_offset, backend
        As :func:`numba_attn.attention`; positions stay global (query ``i`` of the whole
        sequence sits at key position ``i + seqlen_k - seqlen_q``, or ``i + q_offset``).
        Small inputs (slopes, ``kv_lens``, sinks) are read on the client.
    bias, mask : array or dask array broadcastable to (batch, num_heads, seqlen_q, seqlen_k)
        Rechunked to the blocks of the call (broadcast axes stay size 1).
    return_lse : bool, default False
        Also return the log-sum-exp, a dask array (batch, num_heads, seqlen_q).
    split_every : int, default 4
        Partial results merged by one task of the key reduction tree (>= 2).

    Returns
    -------
    out : dask array (batch, seqlen_q, num_heads, head_dim_v), dtype of q
        Chunked as q along batch, sequence and heads.
    lse : dask array (batch, num_heads, seqlen_q), float32 (float64 for float64 inputs)
        Only with ``return_lse``.

    Raises
    ------
    AttentionError (ValueError), TypeError
        As :func:`numba_attn.attention`, raised when the graph is built (nothing runs).

    Notes
    -----
    Partial results of a query block carry ``lse = -inf`` where a query sees none of the
    block's keys, the identity of the merge; sinks are added once, after the merge. float16
    and bfloat16 blocks are computed and merged in float32 and cast once at the end.
    ``causal="top_left"`` with a window or ALiBi and ``seqlen_q != seqlen_k`` (two alignments
    at once) passes each block its causal rule as an explicit boolean mask.

    Examples
    --------
    >>> import numpy as np, dask, dask.array as da, numba_attn
    >>> from numba_attn import distributed
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 12, 4, 16))
    >>> k = rng.standard_normal((2, 12, 2, 16))
    >>> out = distributed.attention(da.from_array(q, chunks=(1, 4, 2, 16)),
    ...                             da.from_array(k, chunks=(1, 6, 1, 16)),
    ...                             da.from_array(k, chunks=(1, 6, 1, 16)), causal=True)
    >>> out.chunks[1]
    (4, 4, 4)
    >>> with dask.config.set(scheduler="synchronous"):
    ...     got = out.compute()
    >>> bool(np.allclose(got, numba_attn.attention(q, k, k, causal=True)))
    True
    """
    q, k, v = (x if isinstance(x, da.Array) else da.asarray(x) for x in (q, k, v))
    for name, x, layout in (("q", q, "(batch, seqlen_q, num_heads, head_dim)"),
                            ("k", k, "(batch, seqlen_k, num_kv_heads, head_dim)"),
                            ("v", v, "(batch, seqlen_k, num_kv_heads, head_dim_v)")):
        dp.check_rank(name, x, 4, layout)
        if any(np.isnan(c) for c in x.shape):
            raise AttentionError(f"{name}: unknown chunk sizes {x.chunks}; call "
                                 f"{name}.compute_chunk_sizes() first")
    dt = dp.check_float("q", q)
    for name, x in (("k", k), ("v", v)):
        if dp.as_np_dtype(x.dtype) != dt:
            raise TypeError(f"{name}: dtype {x.dtype} differs from q's {dt}; "
                            f"cast all of q, k, v to one dtype")
    bsz, sq, h, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    dp.same([("q.shape[0]", bsz), ("k.shape[0]", k.shape[0]), ("v.shape[0]", v.shape[0])],
            "batch sizes")
    dp.same([("k.shape[1]", sk), ("v.shape[1]", v.shape[1])], "seqlen_k of k and v")
    dp.same([("k.shape[2]", hkv), ("v.shape[2]", v.shape[2])], "num_kv_heads of k and v")
    dp.same([("q.shape[3]", d), ("k.shape[3]", k.shape[3])], "head_dim of q and k")
    cfg = AttentionConfig(num_heads=h, num_kv_heads=hkv, head_dim=d, head_dim_v=dv,
                          scale=scale, causal=causal, window=window, softcap=softcap)
    cdt = dp.compute_dtype(dt)
    kl = None if kv_lens is None else dp.check_int_vector("kv_lens", kv_lens, bsz, 0, sk)
    slopes = dp.check_alibi(alibi_slopes, bsz, h, cdt)
    sink = dp.check_sinks(sinks, h, cdt)
    off = sk - sq if q_offset is None else check_offset("q_offset", q_offset)
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)) \
            or split_every < 2:
        raise AttentionError(f"split_every: expected an int >= 2, got {split_every!r}")
    full = (bsz, h, sq, sk)
    bias = _operand("bias", bias, full)
    if mask is not None and dp.as_np_dtype(mask.dtype) != np.bool_:
        raise TypeError(f"mask: expected a boolean array (True = may attend), got dtype "
                        f"{mask.dtype}; use mask.astype(bool) or pass it as bias")
    mask = _operand("mask", mask, full)

    # causal="top_left" is the causal rule aligned at 0; alone (or when both alignments
    # agree) it is a bottom-right call with offset 0, else each block gets it as a mask
    plan_causal = cfg.causal
    tl_mask = False
    if cfg.causal == "top_left":
        if off == 0 or (cfg.window == (-1, -1) and slopes is None):
            plan_causal, off = "bottom_right", 0
        else:
            tl_mask = True
    block_causal = "none" if tl_mask else plan_causal

    q, k, v = _align_chunks(q, k, v, h // hkv)
    if bias is not None:
        bias = _chunk_like(bias, q, k)
    if mask is not None:
        mask = _chunk_like(mask, q, k)

    token = tokenize(q.name, k.name, v.name, cfg, kl, slopes, sink, off, tl_mask, backend,
                     split_every, None if bias is None else bias.name,
                     None if mask is None else mask.name)
    names = {s: f"numba-attn-{s}-{token}" for s in ("block", "merge", "finish", "out", "lse")}
    opts = dict(scale=cfg.scale, window=cfg.window, softcap=cfg.softcap,
                causal=block_causal, backend=backend)
    run_block = functools.partial(_block, opts=opts, cdt=cdt, tl_mask=tl_mask)
    code = CAUSAL_CODES[plan_causal]
    qb_, qs_, qh_ = (np.cumsum((0,) + c) for c in q.chunks[:3])
    ks_ = np.cumsum((0,) + k.chunks[1])
    dsk = {}
    for bi in range(len(q.chunks[0])):
        b0, b1 = int(qb_[bi]), int(qb_[bi + 1])
        klen_max = sk if kl is None else int(kl[b0:b1].max())
        for hi in range(len(q.chunks[2])):
            h0, h1 = int(qh_[hi]), int(qh_[hi + 1])
            sl = None if slopes is None else (
                slopes[0, h0:h1] if slopes.shape[0] == 1 else slopes[b0:b1, h0:h1])
            for qi in range(len(q.chunks[1])):
                qa, qb = int(qs_[qi]), int(qs_[qi + 1])
                lo, hi_k = key_range(qa, qb, off, klen_max, code, *cfg.window)
                parts = []
                for ki in range(len(k.chunks[1])):
                    ka, kb = int(ks_[ki]), int(ks_[ki + 1])
                    if max(lo, ka) >= min(hi_k, kb):
                        continue  # no query of this block sees any of its keys
                    key = (names["block"], bi, hi, qi, ki)
                    kvl = None if kl is None else np.clip(kl[b0:b1] - ka, 0, kb - ka)
                    dsk[key] = (run_block, (q.name, bi, qi, hi, 0), (k.name, bi, ki, hi, 0),
                                (v.name, bi, ki, hi, 0), kvl, sl,
                                _operand_key(bias, bi, hi, qi, ki),
                                _operand_key(mask, bi, hi, qi, ki), qa + off - ka, qa - ka)
                    parts.append(key)
                if not parts:
                    key = (names["merge"], bi, hi, qi, 0, 0)
                    dsk[key] = (_empty, (b1 - b0, qb - qa, h1 - h0, dv), cdt)
                    parts = [key]
                level = 0
                while len(parts) > 1:
                    level += 1
                    groups = [parts[i:i + split_every] for i in range(0, len(parts),
                                                                       split_every)]
                    parts = []
                    for n, g in enumerate(groups):
                        key = (names["merge"], bi, hi, qi, level, n)
                        dsk[key] = (_merge, *g) if len(g) > 1 else g[0]
                        parts.append(key)
                fin = (names["finish"], bi, hi, qi)
                dsk[fin] = (_finish, parts[0], None if sink is None else sink[h0:h1], dt)
                dsk[(names["out"], bi, qi, hi, 0)] = (operator.getitem, fin, 0)
                dsk[(names["lse"], bi, hi, qi)] = (operator.getitem, fin, 1)
    out_keys = {kk: vv for kk, vv in dsk.items() if kk[0] == names["out"]}
    lse_keys = {kk: vv for kk, vv in dsk.items() if kk[0] == names["lse"]}
    inner = {kk: vv for kk, vv in dsk.items() if kk[0] not in (names["out"], names["lse"])}
    deps = [x for x in (q, k, v, bias, mask) if x is not None]
    g = HighLevelGraph.from_collections(names["block"], inner, dependencies=deps)
    layers = dict(g.layers)
    dependencies = dict(g.dependencies)
    layers[names["out"]] = MaterializedLayer(out_keys)
    dependencies[names["out"]] = {names["block"]}
    layers[names["lse"]] = MaterializedLayer(lse_keys)
    dependencies[names["lse"]] = {names["block"]}
    graph = HighLevelGraph(layers, dependencies)
    out = da.Array(graph, names["out"], chunks=q.chunks[:3] + ((dv,),), dtype=dt,
                   meta=np.empty((0, 0, 0, 0), dt))
    if not return_lse:
        return out
    lse = da.Array(graph, names["lse"], chunks=(q.chunks[0], q.chunks[2], q.chunks[1]),
                   dtype=cdt, meta=np.empty((0, 0, 0), cdt))
    return out, lse


# ---------------------------------------------------------------------------------------
# chunk planning (client side)
# ---------------------------------------------------------------------------------------
def _align_chunks(q, k, v, group):
    """q, k, v rechunked only where the blocks need it (see attention's docstring)."""
    q_heads = q.chunks[2]
    if group > 1:
        edges = np.cumsum((0,) + q_heads)
        edges = sorted({int(e) // group * group for e in edges})
        q_heads = tuple(int(x) for x in np.diff(edges))
    kv_heads = tuple(c // group for c in q_heads)
    q = q.rechunk((q.chunks[0], q.chunks[1], q_heads, q.shape[3]))
    k = k.rechunk((q.chunks[0], k.chunks[1], kv_heads, k.shape[3]))
    v = v.rechunk((q.chunks[0], k.chunks[1], kv_heads, v.shape[3]))
    return q, k, v


def _operand(name, x, full):
    """A bias/mask as a 4-D dask array whose axes are 1 or the full size (else an error)."""
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array broadcastable to (batch, heads, "
                        f"seqlen_q, seqlen_k), got {type(x).__name__}")
    if len(x.shape) > 4:
        raise AttentionError(f"{name}: at most 4-D (batch, heads, seqlen_q, seqlen_k), "
                             f"got shape {tuple(x.shape)}")
    shape = (1,) * (4 - len(x.shape)) + tuple(x.shape)
    for ax, n, want in zip(("batch", "heads", "seqlen_q", "seqlen_k"), shape, full):
        if n != 1 and n != want:
            raise AttentionError(
                f"{name}: shape {tuple(x.shape)} does not broadcast to (batch, heads, "
                f"seqlen_q, seqlen_k) = {tuple(full)} (axis {ax} is {n}, expected 1 or {want})")
    x = x if isinstance(x, da.Array) else da.asarray(x)
    return x.reshape(shape)


def _chunk_like(x, q, k):
    """Chunks of (batch, heads, seqlen_q, seqlen_k) blocks; broadcast axes stay one chunk."""
    want = (q.chunks[0], q.chunks[2], q.chunks[1], k.chunks[1])
    return x.rechunk(tuple((1,) if n == 1 else c for n, c in zip(x.shape, want)))


def _operand_key(x, bi, hi, qi, ki):
    if x is None:
        return None
    idx = tuple(0 if n == 1 else i for n, i in zip(x.shape, (bi, hi, qi, ki)))
    return (x.name,) + idx


# ---------------------------------------------------------------------------------------
# tasks (run on the workers, numpy blocks in and out)
# ---------------------------------------------------------------------------------------
def _block(q, k, v, kv_lens, slopes, bias, mask, q_offset, causal_shift, *, opts, cdt,
           tl_mask):
    """One (batch, head, query, key) block: partial (out, lse) in the compute dtype."""
    if tl_mask:  # top-left causal rule in global positions: key ka + j <= query qa + i
        tl = np.arange(k.shape[1])[None, :] <= np.arange(q.shape[1])[:, None] + causal_shift
        mask = tl if mask is None else mask & tl
    q, k, v = (np.asarray(x, dtype=cdt) for x in (q, k, v))
    return _attention(q, k, v, alibi_slopes=slopes, bias=bias, mask=mask, kv_lens=kv_lens,
                      q_offset=int(q_offset), return_lse=True, **opts)


def _empty(shape, cdt):
    """The state of a query block that sees no key: out = 0, lse = -inf."""
    b, s, h, _ = shape
    return np.zeros(shape, cdt), np.full((b, h, s), -np.inf, cdt)


def _merge(*parts):
    out, lse = parts[0]
    for o, l in parts[1:]:
        out, lse = _merge_states(out, lse, o, l)
    return out, lse


def _finish(state, sink, dt):
    """Add the sinks once (a part with lse = sink and no value), cast out to q's dtype."""
    out, lse = state
    if sink is not None:
        s = np.broadcast_to(sink[None, :, None], lse.shape).astype(lse.dtype)
        out, lse = _merge_states(out, lse, np.zeros_like(out), s)
    return out.astype(dt, copy=False), lse
