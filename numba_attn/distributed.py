"""Attention over Dask arrays: batch, head and key-split (context) parallelism.

:func:`attention` takes ``dask.array`` inputs in the BSHD layout of
:func:`numba_attn.attention`, chunked along batch, sequence and head axes, and builds one
task per visible (batch, head, query, key) chunk block: ``numba_attn.attention(...,
return_lse=True)`` on the numpy blocks, with the block's global alignment passed as
``q_offset``. The partial results of a query block are combined over its key blocks with
:func:`numba_attn.merge_states` in a tree (``split_every`` parts per task). Blocks that no
query of the block can see (causal, window, ``kv_lens``) get no task at all.
:func:`attention_varlen` maps packed ragged batches row group by row group (rows whole).

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

from . import validate as dp
from .config import AttentionConfig, AttentionError
from .problem import BATCHED_LAYOUT, VARLEN_LAYOUT, batched_dims, varlen_dims, varlen_rows
from .validate import check_offset
from .functional import attention as _attention
from .functional import attention_varlen as _attention_varlen
from .functional import merge_states as _merge_states
from .masking import CAUSAL_CODES, key_range

__all__ = ["attention", "attention_varlen"]


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
    q, k, v, dt = _inputs(q, k, v, 4, BATCHED_LAYOUT)
    bsz, sq, sk, h, hkv, d, dv = batched_dims(q, k, v)
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
    bias, mask = _operands(bias, mask, (bsz, h, sq, sk))

    # causal="top_left" is the causal rule aligned at 0; alone (or when both alignments
    # agree) it is a bottom-right call with offset 0, else each block gets it as a mask
    plan_causal = cfg.causal
    tl_mask = False
    if cfg.causal == "top_left":
        if off == 0 or (cfg.window == (-1, -1) and slopes is None):
            plan_causal, off = "bottom_right", 0
        else:
            tl_mask = True

    q, k, v = _align_chunks(q, k, v, h // hkv)
    want = (q.chunks[0], q.chunks[2], q.chunks[1], k.chunks[1])
    bias, mask = (None if x is None else _chunk_as(x, want) for x in (bias, mask))
    token = tokenize(q.name, k.name, v.name, cfg, kl, slopes, sink, off, tl_mask, backend,
                     split_every, None if bias is None else bias.name,
                     None if mask is None else mask.name)
    names = {s: f"numba-attn-{s}-{token}" for s in ("block", "merge", "finish", "out", "lse")}
    opts = dict(scale=cfg.scale, window=cfg.window, softcap=cfg.softcap,
                causal="none" if tl_mask else plan_causal, backend=backend)
    run_block = functools.partial(_block, opts=opts, cdt=cdt, tl_mask=tl_mask)
    code = CAUSAL_CODES[plan_causal]
    qb_, qs_, qh_ = (np.cumsum((0,) + c) for c in q.chunks[:3])
    ks_ = np.cumsum((0,) + k.chunks[1])
    dsk = {}
    for bi, hi, qi in np.ndindex(len(q.chunks[0]), len(q.chunks[2]), len(q.chunks[1])):
        b0, b1, h0, h1 = int(qb_[bi]), int(qb_[bi + 1]), int(qh_[hi]), int(qh_[hi + 1])
        qa, qb = int(qs_[qi]), int(qs_[qi + 1])
        sl = None if slopes is None else (
            slopes[0, h0:h1] if slopes.shape[0] == 1 else slopes[b0:b1, h0:h1])
        klen_max = sk if kl is None else int(kl[b0:b1].max())
        lo, hi_k = key_range(qa, qb, off, klen_max, code, *cfg.window)
        parts = []
        for ki in range(len(k.chunks[1])):
            ka, kb = int(ks_[ki]), int(ks_[ki + 1])
            if max(lo, ka) >= min(hi_k, kb):
                continue  # no query of this block sees any of its keys: no task
            key = (names["block"], bi, hi, qi, ki)
            kvl = None if kl is None else np.clip(kl[b0:b1] - ka, 0, kb - ka)
            dsk[key] = (run_block, (q.name, bi, qi, hi, 0), (k.name, bi, ki, hi, 0),
                        (v.name, bi, ki, hi, 0), kvl, sl, _operand_key(bias, bi, hi, qi, ki),
                        _operand_key(mask, bi, hi, qi, ki), qa + off - ka, qa - ka)
            parts.append(key)
        if not parts:
            parts = [(names["merge"], bi, hi, qi, 0, 0)]
            dsk[parts[0]] = (_empty, (b1 - b0, qb - qa, h1 - h0, dv), cdt)
        root = _merge_tree(dsk, parts, (names["merge"], bi, hi, qi), split_every)
        fin = (names["finish"], bi, hi, qi)
        dsk[fin] = (_finish, root, None if sink is None else sink[h0:h1], dt)
        dsk[(names["out"], bi, qi, hi, 0)] = (operator.getitem, fin, 0)
        dsk[(names["lse"], bi, hi, qi)] = (operator.getitem, fin, 1)
    out, lse = _collections(dsk, names, [q, k, v, bias, mask],
                            q.chunks[:3] + ((dv,),), (q.chunks[0], q.chunks[2], q.chunks[1]),
                            dt, cdt)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                     max_seqlen_k=None, causal=False, window=(-1, -1), scale=None,
                     softcap=0.0, alibi_slopes=None, bias=None, mask=None, kv_lens=None,
                     sinks=None, return_lse=False, backend="auto"):
    """:func:`numba_attn.attention_varlen` over Dask arrays: whole rows per task.

    Packed rows are never split: q's chunk edges along ``total_q`` move down to the start
    of the row they fall in, k and v are rechunked to the same rows, and each (row group,
    head chunk) is one :func:`numba_attn.attention_varlen` call. Split a single long row's
    keys with :func:`attention` (batch 1) instead.

    Parameters
    ----------
    q : dask array (total_q, num_heads, head_dim)
    k : dask array (total_k, num_kv_heads, head_dim)
    v : dask array (total_k, num_kv_heads, head_dim_v)
    cu_seqlens_q, cu_seqlens_k : int arrays (batch + 1,)
        Row offsets, read on the client.
    max_seqlen_q, max_seqlen_k, causal, window, scale, softcap, alibi_slopes, kv_lens, \
sinks, backend
        As :func:`numba_attn.attention_varlen`.
    bias, mask : array or dask array broadcastable to (batch, num_heads, max_seqlen_q, \
max_seqlen_k)
        Rechunked to the row groups and head chunks.
    return_lse : bool, default False
        Also return lse, a dask array (num_heads, total_q).

    Returns
    -------
    out : dask array (total_q, num_heads, head_dim_v); lse : dask array (num_heads, total_q)

    Raises
    ------
    AttentionError (ValueError), TypeError
        As :func:`numba_attn.attention_varlen`, when the graph is built.

    Examples
    --------
    >>> import numpy as np, dask, dask.array as da, numba_attn
    >>> from numba_attn import distributed
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((9, 2, 8))            # rows of 2, 3 and 4 tokens
    >>> cu = np.array([0, 2, 5, 9])
    >>> out = distributed.attention_varlen(da.from_array(q, chunks=(4, 2, 8)),
    ...                                    da.from_array(q, chunks=(4, 2, 8)),
    ...                                    da.from_array(q, chunks=(4, 2, 8)), cu, cu)
    >>> out.chunks[0]   # edges 4 and 8 moved down to the rows' starts 2 and 5
    (2, 3, 4)
    >>> with dask.config.set(scheduler="synchronous"):
    ...     got = out.compute()
    >>> bool(np.allclose(got, numba_attn.attention_varlen(q, q, q, cu, cu)))
    True
    """
    q, k, v, dt = _inputs(q, k, v, 3, VARLEN_LAYOUT)
    tq, tk, h, hkv, d, dv = varlen_dims(q, k, v)
    cfg = AttentionConfig(num_heads=h, num_kv_heads=hkv, head_dim=d, head_dim_v=dv,
                          scale=scale, causal=causal, window=window, softcap=softcap)
    cdt = dp.compute_dtype(dt)
    _, cq, ck, mq, mk, kl = varlen_rows(cu_seqlens_q, cu_seqlens_k, tq, tk, max_seqlen_q,
                                        max_seqlen_k, kv_lens)
    bsz = len(cq) - 1
    slopes = dp.check_alibi(alibi_slopes, bsz, h, cdt)
    sink = dp.check_sinks(sinks, h, cdt)
    bias, mask = _operands(bias, mask, (bsz, h, mq, mk))

    # row groups: q's chunk edges moved down to the start of the row they fall in
    edges = np.searchsorted(cq, np.cumsum((0,) + q.chunks[0]), side="right") - 1
    rows = np.array(sorted({0, bsz} | {int(e) for e in edges if 0 < e < bsz}))
    q_heads, kv_heads = _head_chunks(q.chunks[1], h // hkv)
    q = q.rechunk((tuple(np.diff(cq[rows]).tolist()), q_heads, d))
    k = k.rechunk((tuple(np.diff(ck[rows]).tolist()), kv_heads, d))
    v = v.rechunk((k.chunks[0], kv_heads, dv))
    want = (tuple(np.diff(rows).tolist()), q_heads, (mq,), (mk,))
    bias, mask = (None if x is None else _chunk_as(x, want) for x in (bias, mask))
    token = tokenize(q.name, k.name, v.name, cfg, cq, ck, mq, mk, kl, slopes, sink, backend,
                     None if bias is None else bias.name, None if mask is None else mask.name)
    names = {s: f"numba-attn-{s}-{token}" for s in ("varlen", "out", "lse")}
    run = functools.partial(_varlen_block, cdt=cdt, opts=dict(
        scale=cfg.scale, window=cfg.window, softcap=cfg.softcap, causal=cfg.causal,
        backend=backend, max_seqlen_q=mq, max_seqlen_k=mk))
    qh_ = np.cumsum((0,) + q_heads)
    dsk = {}
    for gi, hi in np.ndindex(len(rows) - 1, len(q_heads)):
        r0, r1, h0, h1 = int(rows[gi]), int(rows[gi + 1]), int(qh_[hi]), int(qh_[hi + 1])
        sl = None if slopes is None else (
            slopes[0, h0:h1] if slopes.shape[0] == 1 else slopes[r0:r1, h0:h1])
        key = (names["varlen"], gi, hi)
        dsk[key] = (run, (q.name, gi, hi, 0), (k.name, gi, hi, 0), (v.name, gi, hi, 0),
                    cq[r0:r1 + 1] - cq[r0], ck[r0:r1 + 1] - ck[r0],
                    None if kl is None else kl[r0:r1], sl,
                    None if sink is None else sink[h0:h1], _operand_key(bias, gi, hi, 0, 0),
                    _operand_key(mask, gi, hi, 0, 0), dt)
        dsk[(names["out"], gi, hi, 0)] = (operator.getitem, key, 0)
        dsk[(names["lse"], hi, gi)] = (operator.getitem, key, 1)
    names["block"] = names["varlen"]
    out, lse = _collections(dsk, names, [q, k, v, bias, mask], q.chunks[:2] + ((dv,),),
                            (q.chunks[1], q.chunks[0]), dt, cdt)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# chunk planning (client side)
# ---------------------------------------------------------------------------------------
def _inputs(q, k, v, ndim, layouts):
    """q, k, v as dask arrays of known shape and one float dtype; returns them and it."""
    q, k, v = (x if isinstance(x, da.Array) else da.asarray(x) for x in (q, k, v))
    for name, x, layout in (("q", q, layouts[0]), ("k", k, layouts[1]),
                            ("v", v, layouts[1].replace("head_dim", "head_dim_v"))):
        dp.check_rank(name, x, ndim, layout)
        if any(np.isnan(c) for c in x.shape):
            raise AttentionError(f"{name}: unknown chunk sizes {x.chunks}; call "
                                 f"{name}.compute_chunk_sizes() first")
    dt = dp.check_float("q", q)
    for name, x in (("k", k), ("v", v)):
        if dp.as_np_dtype(x.dtype) != dt:
            raise TypeError(f"{name}: dtype {x.dtype} differs from q's {dt}; "
                            f"cast all of q, k, v to one dtype")
    return q, k, v, dt


def _operands(bias, mask, full):
    if mask is not None and hasattr(mask, "dtype") and dp.as_np_dtype(mask.dtype) != np.bool_:
        raise TypeError(f"mask: expected a boolean array (True = may attend), got dtype "
                        f"{mask.dtype}; use mask.astype(bool) or pass it as bias")
    return _operand("bias", bias, full), _operand("mask", mask, full)


def _head_chunks(q_heads, group):
    """q's head chunks moved down to whole GQA groups, and the matching kv head chunks."""
    if group > 1:
        edges = sorted({int(e) // group * group for e in np.cumsum((0,) + tuple(q_heads))})
        q_heads = tuple(int(x) for x in np.diff(edges))
    return tuple(q_heads), tuple(c // group for c in q_heads)


def _align_chunks(q, k, v, group):
    """q, k, v rechunked only where the blocks need it (see attention's docstring)."""
    q_heads, kv_heads = _head_chunks(q.chunks[2], group)
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


def _chunk_as(x, want):
    """A bias/mask in the (batch, heads, seqlen_q, seqlen_k) chunks ``want``; broadcast
    axes stay one chunk of 1."""
    return x.rechunk(tuple((1,) if n == 1 else c for n, c in zip(x.shape, want)))


def _merge_tree(dsk, parts, prefix, split_every):
    """Tasks merging ``parts`` ``split_every`` at a time, level by level; the root's key."""
    level = 0
    while len(parts) > 1:
        level += 1
        groups = [parts[i:i + split_every] for i in range(0, len(parts), split_every)]
        parts = []
        for n, g in enumerate(groups):
            key = prefix + (level, n)
            dsk[key] = (_merge, *g) if len(g) > 1 else g[0]
            parts.append(key)
    return parts[0]


def _collections(dsk, names, deps, out_chunks, lse_chunks, dt, cdt):
    """The out and lse dask arrays of a graph whose chunk keys are named out / lse."""
    inner = {key: t for key, t in dsk.items() if key[0] not in (names["out"], names["lse"])}
    g = HighLevelGraph.from_collections(names["block"], inner,
                                        dependencies=[x for x in deps if x is not None])
    layers, dependencies = dict(g.layers), dict(g.dependencies)
    for which in ("out", "lse"):
        layers[names[which]] = MaterializedLayer(
            {key: t for key, t in dsk.items() if key[0] == names[which]})
        dependencies[names[which]] = {names["block"]}
    graph = HighLevelGraph(layers, dependencies)
    out = da.Array(graph, names["out"], chunks=out_chunks, dtype=dt,
                   meta=np.empty((0,) * len(out_chunks), dt))
    lse = da.Array(graph, names["lse"], chunks=lse_chunks, dtype=cdt,
                   meta=np.empty((0,) * len(lse_chunks), cdt))
    return out, lse


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


def _varlen_block(q, k, v, cu_q, cu_k, kv_lens, slopes, sinks, bias, mask, dt, *, cdt,
                  opts):
    """One (row group, head chunk) block: (out in q's dtype, lse) of whole rows."""
    q, k, v = (np.asarray(x, dtype=cdt) for x in (q, k, v))
    out, lse = _attention_varlen(q, k, v, cu_q, cu_k, alibi_slopes=slopes, bias=bias,
                                 mask=mask, kv_lens=kv_lens, sinks=sinks, return_lse=True,
                                 **opts)
    return out.astype(dt, copy=False), lse


def _empty(shape, cdt):
    """The state of a query block that sees no key: out = 0, lse = -inf."""
    b, s, h, _ = shape
    return np.zeros(shape, cdt), np.full((b, h, s), -np.inf, cdt)


def _merge(*parts):
    out, lse = parts[0]
    for part_out, part_lse in parts[1:]:
        out, lse = _merge_states(out, lse, part_out, part_lse)
    return out, lse


def _finish(state, sink, dt):
    """Add the sinks once (a part with lse = sink and no value), cast out to q's dtype."""
    out, lse = state
    if sink is not None:
        s = np.broadcast_to(sink[None, :, None], lse.shape).astype(lse.dtype)
        out, lse = _merge_states(out, lse, np.zeros_like(out), s)
    return out.astype(dt, copy=False), lse
