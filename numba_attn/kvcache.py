"""Attention with a KV cache: rotary, in-place append and attention over the whole cache.

One call does what a decoding step needs (FlashAttention's ``flash_attn_with_kvcache``):
rotate the new queries and keys at each row's current position, append the new keys and
values at ``seqlens`` in place, advance ``seqlens``, then attend over every valid key of
each row. The attention itself is the canonical :class:`numba_attn.dispatch.Problem` read
straight from the cache storage (through the block table for a paged cache), so every
backend serves it without gathering the cache.
"""
from __future__ import annotations

import numpy as np

from . import dispatch as dp
from . import quant
from .cache import KVCache, PagedKVCache, _on_device
from .config import AttentionError, check_flag
from .interop import Array, like, to_numpy
from . import layout as lay
from .mods import BlockMask, MaskMod, ScoreMod
from .functional import _lse_bhs, build_problem, check_out, run_and_finish
from .rope import check_tables, rotate, token_positions

__all__ = ["attention_with_kvcache"]


@lay.entry("q", "k_new", "v_new", "out", kv="cache")
def attention_with_kvcache(q: Array, cache: KVCache | PagedKVCache,
                           k_new: Array | None = None, v_new: Array | None = None, *,
                           rotary_cos: Array | None = None, rotary_sin: Array | None = None,
                           rotary_interleaved: bool = False, causal: bool | str = False,
                           window: tuple[int, int] = (-1, -1), scale: float | None = None,
                           softcap: float = 0.0, alibi_slopes: Array | None = None,
                           bias: Array | None = None, mask: Array | None = None,
                           sinks: Array | None = None, return_lse: bool = False,
                           out: Array | None = None, score_mod: ScoreMod | None = None,
                           score_mod_args: tuple = (), mask_mod: MaskMod | None = None,
                           mask_mod_args: tuple = (), block_mask: BlockMask | None = None,
                           backend: str = "auto",
                           layout: str = "bshd") -> Array | tuple[Array, Array]:
    """Decode / chunked-prefill step: append ``k_new``/``v_new`` to ``cache``, attend ``q``.

    For each row ``b`` with ``L = cache.seqlens[b]`` before the call and ``n = seqlen_new``:

    1. with rotary tables, query ``i`` and new key ``t`` are rotated at positions
       ``L + i`` and ``L + t`` (FlashAttention's rule for causal/local calls);
    2. ``k_new[b]``/``v_new[b]`` are written in place at positions ``L .. L + n - 1``
       and ``cache.seqlens[b]`` becomes ``L + n``;
    3. ``q[b]`` attends over keys ``0 .. L + n - 1`` with bottom-right alignment: query
       ``i`` sits at key position ``i + L + n - seqlen_q``.

    Parameters
    ----------
    q : array (batch, seqlen_q, num_heads, head_dim)
        The cache's dtype and device (float32 also for a host float16 / bfloat16 cache;
        float32, float16 or bfloat16 for an int8 cache); ``num_heads %
        cache.num_kv_heads == 0``.
    cache : KVCache or PagedKVCache
        Updated in place.
    k_new : array (batch, seqlen_new, num_kv_heads, head_dim), optional
    v_new : array (batch, seqlen_new, num_kv_heads, head_dim_v), optional
        Both or neither; the cache's dtype and device (an int8 cache: any float dtype,
        quantized per (token, kv head) as they are written).
    rotary_cos, rotary_sin : array (max_position, rotary_dim // 2), optional
        Tables as :func:`numba_attn.rotary_cos_sin` returns; ``rotary_dim <= head_dim``
        (channels past it pass through). Both or neither.
    rotary_interleaved : bool, default False
        GPT-J pairs ``(2c, 2c + 1)`` instead of GPT-NeoX half-split pairs.
    causal, window, scale, softcap, alibi_slopes, sinks, backend
        As :func:`numba_attn.attention`; alignment uses each row's new length.
    bias, mask : broadcastable to (batch, num_heads, seqlen_q, max(new seqlens)), optional
        Indexed by key position in the row.
    return_lse : bool, default False
        Also return lse (batch, num_heads, seqlen_q).
    out : ndarray (batch, seqlen_q, num_heads, head_dim_v), optional
        Written in place and returned (host caches).
    score_mod, score_mod_args, mask_mod, mask_mod_args, block_mask
        As :func:`numba_attn.attention` (host caches); ``q_idx`` is the query's index in
        ``q`` (its cache position is ``q_idx + L + n - seqlen_q``), ``kv_idx`` the cache
        position. A block mask must cover seqlen_q x (L + n) (build it for the capacity).
    layout : {"bshd", "bhsd"}, default "bshd"
        "bhsd": q, k_new, v_new and out= are (batch, heads, seq, dim) and out comes back
        so too (a transposed view); the cache's storage stays (batch, seq, heads, dim).

    Returns
    -------
    out : array (batch, seqlen_q, num_heads, head_dim_v), dtype of q
    lse : array (batch, num_heads, seqlen_q), only with ``return_lse``

    Raises
    ------
    AttentionError (ValueError)
        Bad shapes or options, cache overflow (no room or no free page), block-table
        entries out of range, positions past the rotary tables. Raised before anything is
        written: the cache is left unchanged.
    TypeError
        Dtypes that differ from the cache's.
    BackendUnavailable
        ``backend`` cannot serve the call.

    Notes
    -----
    Key padding comes from the cache (``seqlens``), so there is no ``kv_lens`` argument.

    With seqlen_q = 2 and L + n = 5 keys, ``causal=True`` (bottom-right) gives::

        1 1 1 1 0
        1 1 1 1 1

    and ``causal="top_left"`` gives::

        1 0 0 0 0
        1 1 0 0 0

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> cache = numba_attn.KVCache(1, 64, num_kv_heads=2, head_dim=16)
    >>> cos, sin = numba_attn.rotary_cos_sin(64, 16)
    >>> for step in range(3):                          # three decoding steps
    ...     q = rng.standard_normal((1, 1, 4, 16), dtype=np.float32)
    ...     kv = rng.standard_normal((1, 1, 2, 16), dtype=np.float32)
    ...     o = numba_attn.attention_with_kvcache(q, cache, kv, kv, rotary_cos=cos,
    ...                                           rotary_sin=sin, causal=True)
    >>> o.shape, cache.seqlens.tolist()
    ((1, 1, 4, 16), [3])
    """
    if not isinstance(cache, (KVCache, PagedKVCache)):
        raise TypeError(f"cache: expected a KVCache or PagedKVCache, got "
                        f"{type(cache).__name__}")
    dp.check_rank("q", q, 4, "(batch, seqlen_q, num_heads, head_dim)")
    dt = dp.check_float("q", q)
    q_ref, out_ref = q, out
    return_lse = check_flag("return_lse", return_lse)
    rotary_interleaved = check_flag("rotary_interleaved", rotary_interleaved)
    if cache.device != "cuda":  # host arrays (torch CPU tensors: zero-copy numpy views)
        q = to_numpy("q", q) if not _on_device(q) else q
        k_new = None if k_new is None or _on_device(k_new) else to_numpy("k_new", k_new)
        v_new = None if v_new is None or _on_device(v_new) else to_numpy("v_new", v_new)
    if cache.quantized:
        if dt != np.float32 and dt != np.float16 and not dp._is_bfloat16(dt):
            raise TypeError(f"q: a {cache.dtype} cache takes float32, float16 or bfloat16 "
                            f"q, got {dt}")
    elif dt != cache.dtype and not (dt == np.float32 and cache.mixed_ok()):
        raise TypeError(f"q: dtype {dt} differs from the cache's {cache.dtype}; cast q (a "
                        f"host float16 / bfloat16 cache also takes float32 q)")
    on_dev = cache.device == "cuda"
    if _on_device(q) != on_dev:
        raise AttentionError(f"q: lives on {'cuda' if _on_device(q) else 'cpu'}, the cache on "
                             f"{cache.device}; pass arrays on the cache's device")
    bsz, sq, h, d = q.shape
    hkv, dv = cache.num_kv_heads, cache.head_dim_v
    dp.same([("q.shape[0]", bsz), ("cache.batch", cache.batch)], "batch sizes")
    dp.same([("q.shape[3]", d), ("cache.head_dim", cache.head_dim)], "head dims")
    if (k_new is None) != (v_new is None):
        raise AttentionError("k_new, v_new: pass both or neither")
    n_new = 0 if k_new is None else cache.check_new(k_new, v_new)
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise AttentionError("rotary_cos, rotary_sin: pass both or neither")
        check_tables(rotary_cos, rotary_sin, d)
        base = cache._check_lengths("cache.seqlens", cache._seqlens)
        span = max(sq, n_new)
        pos = token_positions(base[:, None] + np.arange(span, dtype=np.int64)[None, :],
                              (bsz, span), rotary_cos.shape[0])
        pos = pos.reshape(bsz, span)
    cdt = dp.compute_dtype(dt)
    out = check_out(out, (bsz, sq, h, dv), dt, "cpu") if not on_dev or out is None else out
    if on_dev and out is not None:
        raise AttentionError("out: only host caches accept out=")

    # plan the append (raises on overflow / bad block table; nothing written yet)
    plan = cache.reserve(n_new)
    new_lens = plan[1]
    ks, vs, k_start, block_table, block_size = cache.layout()
    rows = np.zeros((bsz, 5), np.int64)
    rows[:, 0] = np.arange(bsz) * sq
    rows[:, 1] = sq
    rows[:, 2] = k_start
    rows[:, 3] = new_lens
    rows[:, 4] = new_lens - sq
    qp = _canonical_q(q, cdt, on_dev).reshape(bsz * sq, h, d)
    p = build_problem(
        q=qp, k=ks, v=vs, rows=rows, block_table=block_table, block_size=block_size,
        max_seqlen_q=sq, max_seqlen_k=int(new_lens.max(initial=0)), batch=bsz,
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks, has_kv_lens=False,
        out_dtype=dt, device="cuda" if on_dev else "cpu", score_mod=score_mod,
        score_mod_args=score_mod_args, mask_mod=mask_mod, mask_mod_args=mask_mod_args,
        block_mask=block_mask)
    if cache.quantized:  # the cpu and cuda kernels read the scales (their launch decides)
        p.extra["kv_scales"] = cache._flat_scales()
    be = dp.select(p, backend)  # an unavailable backend raises here, before any write

    # from here on nothing raises for bad input: rotate, append, attend
    if rotary:  # new arrays: the caller's q and k_new are never modified
        qpos = np.ascontiguousarray(pos[:, :sq]).reshape(-1)
        p.q = rotate(qp, rotary_cos, rotary_sin, qpos, rotary_interleaved)
        if n_new:
            kpos = np.ascontiguousarray(pos[:, :n_new]).reshape(-1)
            k3 = _canonical_q(k_new, cdt, on_dev).reshape(bsz * n_new, hkv, d)
            k_new = rotate(k3, rotary_cos, rotary_sin, kpos, rotary_interleaved)
            if not on_dev and not cache.quantized:
                k_new = k_new.astype(cache.dtype, copy=False)
    slots = cache.commit(plan)
    if n_new:
        cache._write(slots, k_new, v_new)
    if cache.quantized and not be.reads_quantized_kv:  # it reads float32 copies
        p = quant.dequantized(p)
    o, lse = run_and_finish(p, backend, out, (bsz, sq, h, dv))
    if out_ref is not None:
        o = out_ref
    if not return_lse:
        return like(q_ref, o)
    return like(q_ref, o), like(q_ref, _lse_bhs(lse, bsz, sq, h))


def _canonical_q(x, cdt, on_dev):
    """Host: a C-contiguous array of the compute dtype. Device: the C-contiguous numba
    device array as it is (the cuda kernels read float16 storage themselves)."""
    if not on_dev:
        return dp.host("q", x, cdt)
    from numba import cuda

    xd = cuda.as_cuda_array(x) if not hasattr(x, "copy_to_host") else x
    if not xd.is_c_contiguous():
        raise AttentionError("q: a device array must be C-contiguous; copy it on the "
                             "device first")
    return xd

