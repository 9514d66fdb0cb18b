"""Drop-in names for code being ported: FlashAttention's functions and torch's SDPA.

Thin wrappers over the native API with the exact signatures and defaults people already
call (``flash_attn`` 2.x's ``flash_attn_interface``, ``torch.nn.functional``), numpy arrays
in and out, torch CPU tensors in and out (zero-copy). Semantics are the originals':
FlashAttention's bottom-right causal alignment, its ``window_size=(-1, -1)`` (-1 means
unbounded), its kv-cache rotary rule and ``rotary_interleaved=True`` default; torch's
``(batch, heads, seq, dim)`` layout, top-left ``is_causal`` and GQA rule.

Options numba_attn cannot honour raise a clear error, never silently ignored:
``dropout_p != 0`` raises ``NotImplementedError`` (dropout arrives with training, the
backward-pass issue), as do ``block_table`` in the varlen form and ``cache_leftpad`` or
``cache_batch_idx`` together with a paged cache (FlashAttention refuses those too).
``deterministic`` and ``num_splits`` are accepted: numba_attn is always deterministic and
chooses its own key splits (results do not depend on them).
"""
from __future__ import annotations

import numpy as np

from . import dispatch as dp
from .autograd import wants_grad
from .config import AttentionError, check_flag, check_int
from .functional import attention, attention_varlen, build_problem, run_and_finish
from .interop import Array, is_torch, like, to_numpy
from .rope import check_tables, rotate, token_positions

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_with_kvcache",
           "scaled_dot_product_attention"]


def _no_dropout(dropout_p):
    if not isinstance(dropout_p, (int, float, np.integer, np.floating)) or isinstance(
            dropout_p, bool):
        raise TypeError(f"dropout_p: expected a float, got {dropout_p!r}")
    if dropout_p != 0:
        raise NotImplementedError(
            f"dropout_p: {dropout_p!r} is not supported yet (numba_attn's forward is "
            f"inference-only; dropout comes with the training/backward issue); pass 0.0")


def _softcap(softcap):
    return 0.0 if softcap is None else softcap


def _fa_result(out, lse, return_attn_probs):
    # FlashAttention returns (out, softmax_lse, S_dmask); S_dmask is for testing dropout
    # and is not materialised here: None.
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q: Array, k: Array, v: Array, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1),  # -1 means infinite
                    softcap: float = 0.0, alibi_slopes: Array | None = None,
                    deterministic: bool = False,
                    return_attn_probs: bool = False) -> Array | tuple[Array, Array, None]:
    """FlashAttention's ``flash_attn_func`` over :func:`numba_attn.attention`.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k, v : array (batch, seqlen_k, nheads_k, headdim[_v])
        ``nheads % nheads_k == 0`` (MQA/GQA). numpy arrays or torch CPU tensors.
    dropout_p : float, default 0.0
        Must be 0.0 (``NotImplementedError`` otherwise, see the module docstring).
    softmax_scale : float, default 1 / sqrt(headdim)
    causal : bool, default False
        Bottom-right aligned: with seqlen_q = 2, seqlen_k = 5 the mask is::

            1 1 1 1 0
            1 1 1 1 1

    window_size : (int, int), default (-1, -1)
        Sliding window (left, right); -1 means infinite.
    softcap : float, default 0.0
        ``softcap * tanh(s / softcap)`` when > 0.
    alibi_slopes : array (nheads,) or (batch, nheads), optional
        Adds ``-slope * |i + seqlen_k - seqlen_q - j|``.
    deterministic : bool, default False
        Accepted; numba_attn is always deterministic.
    return_attn_probs : bool, default False
        Also return ``softmax_lse`` (batch, nheads, seqlen_q) and ``None`` for the
        attention probabilities (FlashAttention's testing-only ``S_dmask``).

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim_v), or (out, softmax_lse, None)

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn.compat import flash_attn_func
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 4, 8), dtype=np.float32)
    >>> kv = rng.standard_normal((1, 6, 2, 8), dtype=np.float32)
    >>> out, lse, _ = flash_attn_func(q, kv, kv, causal=True, return_attn_probs=True)
    >>> out.shape, lse.shape
    ((1, 4, 4, 8), (1, 4, 4))
    """
    _no_dropout(dropout_p)
    check_flag("deterministic", deterministic)
    ret = check_flag("return_attn_probs", return_attn_probs)
    res = attention(q, k, v, causal=check_flag("causal", causal), window=window_size,
                    scale=softmax_scale, softcap=_softcap(softcap),
                    alibi_slopes=alibi_slopes, return_lse=ret)
    return _fa_result(*res, True) if ret else res


def flash_attn_varlen_func(q: Array, k: Array, v: Array, cu_seqlens_q: Array,
                           cu_seqlens_k: Array, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None,
                           causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1),  # -1 means infinite
                           softcap: float = 0.0, alibi_slopes: Array | None = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: None = None) -> Array | tuple[Array, Array, None]:
    """FlashAttention's ``flash_attn_varlen_func`` over :func:`numba_attn.attention_varlen`.

    Parameters
    ----------
    q : array (total_q, nheads, headdim)
    k, v : array (total_k, nheads_k, headdim[_v])
    cu_seqlens_q, cu_seqlens_k : int32 array (batch + 1,)
        Row offsets into q and k/v.
    max_seqlen_q, max_seqlen_k : int
        Longest row (checked against the offsets).
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic
        As :func:`flash_attn_func`; causal alignment is per row.
    return_attn_probs : bool, default False
        Also return ``softmax_lse`` (nheads, total_q) and ``None``.
    block_table : None
        Paged k/v in the varlen form is not supported (``NotImplementedError``); use
        :func:`flash_attn_with_kvcache` or :class:`numba_attn.PagedKVCache`.

    Returns
    -------
    out : array (total_q, nheads, headdim_v), or (out, softmax_lse, None)

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn.compat import flash_attn_varlen_func
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((5, 2, 8), dtype=np.float32)   # rows of 2 and 3 tokens
    >>> cu = np.array([0, 2, 5], np.int32)
    >>> flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, causal=True).shape
    (5, 2, 8)
    """
    _no_dropout(dropout_p)
    if block_table is not None:
        raise NotImplementedError("block_table: paged k/v in flash_attn_varlen_func is not "
                                  "supported; use flash_attn_with_kvcache or PagedKVCache")
    check_flag("deterministic", deterministic)
    ret = check_flag("return_attn_probs", return_attn_probs)
    res = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                           max_seqlen_q=check_int("max_seqlen_q", max_seqlen_q, lo=0),
                           max_seqlen_k=check_int("max_seqlen_k", max_seqlen_k, lo=0),
                           causal=check_flag("causal", causal), window=window_size,
                           scale=softmax_scale, softcap=_softcap(softcap),
                           alibi_slopes=alibi_slopes, return_lse=ret)
    return _fa_result(*res, True) if ret else res


def _unpack(name, x, axis_len, axis, layout):
    dp.check_rank(name, x, 5, layout)
    if x.shape[axis] != axis_len:
        raise AttentionError(f"{name}: expected {layout}, axis {axis} of length {axis_len}, "
                             f"got shape {tuple(x.shape)}")
    return [x[:, :, i] for i in range(axis_len)]


def flash_attn_qkvpacked_func(qkv: Array, dropout_p: float = 0.0,
                              softmax_scale: float | None = None, causal: bool = False,
                              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Array | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False
                              ) -> Array | tuple[Array, Array, None]:
    """FlashAttention's ``flash_attn_qkvpacked_func``: q, k, v stacked on axis 2.

    Parameters
    ----------
    qkv : array (batch, seqlen, 3, nheads, headdim)
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
    return_attn_probs
        As :func:`flash_attn_func`.

    Returns
    -------
    out : array (batch, seqlen, nheads, headdim), or (out, softmax_lse, None)

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn.compat import flash_attn_func, flash_attn_qkvpacked_func
    >>> qkv = np.random.default_rng(0).standard_normal((1, 5, 3, 2, 8))
    >>> out = flash_attn_qkvpacked_func(qkv, causal=True)
    >>> bool(np.allclose(out, flash_attn_func(*np.moveaxis(qkv, 2, 0), causal=True)))
    True
    """
    q, k, v = _unpack("qkv", qkv, 3, 2, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: Array, kv: Array, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Array | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False
                             ) -> Array | tuple[Array, Array, None]:
    """FlashAttention's ``flash_attn_kvpacked_func``: k and v stacked on axis 2.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    kv : array (batch, seqlen_k, 2, nheads_k, headdim)
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
    return_attn_probs
        As :func:`flash_attn_func`.

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, None)

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn.compat import flash_attn_kvpacked_func
    >>> rng = np.random.default_rng(0)
    >>> q, kv = rng.standard_normal((1, 2, 4, 8)), rng.standard_normal((1, 6, 2, 2, 8))
    >>> flash_attn_kvpacked_func(q, kv, causal=True).shape
    (1, 2, 4, 8)
    """
    k, v = _unpack("kv", kv, 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


# ---------------------------------------------------------------------------------------
# flash_attn_with_kvcache: the caller's cache arrays, updated in place
# ---------------------------------------------------------------------------------------
def _row_ints(name, x, batch, lo, hi, default):
    """(batch,) int64 from None (default), an int, or an int array; entries in [lo, hi]."""
    if x is None:
        a = np.full(batch, default, np.int64)
    elif np.ndim(to_numpy(name, x) if is_torch(x) else x) == 0:  # an int for every row
        a = np.full(batch, check_int(name, to_numpy(name, x) if is_torch(x) else x), np.int64)
    else:
        return dp.check_int_vector(name, x, batch, lo, hi)
    bad = (a < lo) | (a > hi)
    if bad.any():
        raise AttentionError(f"{name}: entries must lie in [{lo}, {hi}], got {int(a[0])}")
    return a


def flash_attn_with_kvcache(q: Array, k_cache: Array, v_cache: Array,
                            k: Array | None = None, v: Array | None = None,
                            rotary_cos: Array | None = None, rotary_sin: Array | None = None,
                            cache_seqlens: int | Array | None = None,
                            cache_batch_idx: Array | None = None,
                            cache_leftpad: Array | None = None,
                            block_table: Array | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1),  # -1 means infinite
                            softcap: float = 0.0, rotary_interleaved: bool = True,
                            alibi_slopes: Array | None = None, num_splits: int = 0,
                            return_softmax_lse: bool = False) -> Array | tuple[Array, Array]:
    """FlashAttention's ``flash_attn_with_kvcache``: append ``k``/``v`` to the caller's
    cache arrays in place, then attend ``q`` over each row's keys.

    For row ``b`` with ``L = cache_seqlens[b]``, ``P = cache_leftpad[b]`` (0 by default)
    and ``n = k.shape[1]``:

    1. with rotary tables, the new keys are rotated at positions ``L .. L + n - 1``; the
       queries at ``L + i`` when ``causal`` or a window is set, else all at ``L``
       (FlashAttention's rule);
    2. ``k``/``v`` are written in place at cache positions ``L .. L + n - 1`` of cache row
       ``cache_batch_idx[b]`` (through ``block_table`` for a paged cache);
       ``cache_seqlens`` is *not* changed (as FlashAttention; the caller advances it);
    3. ``q[b]`` attends over cache positions ``P .. L + n - 1``, bottom-right aligned to
       that range (``L + n - P`` keys).

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k_cache, v_cache : array (batch_cache, seqlen_cache, nheads_k, headdim[_v]), or with
        ``block_table`` (num_blocks, page_block_size, nheads_k, headdim[_v])
        numpy arrays or torch CPU tensors of q's dtype; written in place.
    k, v : array (batch, seqlen_new, nheads_k, headdim[_v]), optional
        Both or neither.
    rotary_cos, rotary_sin : array (seqlen_ro, rotary_dim // 2), optional
    cache_seqlens : int or int32 array (batch,), default seqlen_cache (full rows)
    cache_batch_idx : int32 array (batch,), optional
        Cache row of each batch row (default ``0 .. batch - 1``); distinct when ``k`` is
        given. Not with ``block_table``.
    cache_leftpad : int32 array (batch,), optional
        First valid cache position of each row, ``<= cache_seqlens``. Not with
        ``block_table``.
    block_table : int32 array (batch, max_num_blocks_per_seq), optional
        Pages of each row (paged cache).
    softmax_scale, causal, window_size, softcap, alibi_slopes
        As :func:`flash_attn_func`.
    rotary_interleaved : bool, default True
        GPT-J pairs ``(2c, 2c + 1)`` (FlashAttention's default); False: GPT-NeoX halves.
    num_splits : int, default 0
        Accepted (>= 0); numba_attn chooses its own split of the keys.
    return_softmax_lse : bool, default False
        Also return ``softmax_lse`` (batch, nheads, seqlen_q).

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim_v), or (out, softmax_lse)

    Raises
    ------
    AttentionError (ValueError), TypeError
        Before anything is written: shapes, dtypes, positions past the cache or the
        rotary tables, block-table entries out of range.
    NotImplementedError
        ``cache_batch_idx`` or ``cache_leftpad`` with ``block_table``.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn.compat import flash_attn_with_kvcache
    >>> rng = np.random.default_rng(0)
    >>> k_cache = np.zeros((1, 16, 2, 8), np.float32); v_cache = np.zeros_like(k_cache)
    >>> seqlens = np.array([0], np.int32)
    >>> for step in range(3):
    ...     q = rng.standard_normal((1, 1, 4, 8), dtype=np.float32)
    ...     kv = rng.standard_normal((1, 1, 2, 8), dtype=np.float32)
    ...     out = flash_attn_with_kvcache(q, k_cache, v_cache, kv, kv,
    ...                                   cache_seqlens=seqlens, causal=True)
    ...     seqlens += 1
    >>> out.shape, bool(np.all(k_cache[0, 3:] == 0)), bool(np.any(k_cache[0, 2] != 0))
    ((1, 1, 4, 8), True, True)
    """
    q_ref = q
    dp.check_rank("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    dp.check_rank("k_cache", k_cache, 4, "(batch_cache, seqlen_cache, nheads_k, headdim)")
    dp.check_rank("v_cache", v_cache, 4, "(batch_cache, seqlen_cache, nheads_k, headdim_v)")
    dt = dp.check_float("q", q)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if dp.array_device(x) != "cpu" or dp.array_device(q) != "cpu":
            raise AttentionError(f"{name}: numba_attn.compat takes host arrays (numpy, torch "
                                 f"CPU); on a GPU use numba_attn.KVCache(device='cuda')")
        if dp.check_float(name, x) != dt:
            raise TypeError(f"{name}: dtype {dp.as_np_dtype(x.dtype)} differs from q's {dt}")
    qh, kc, vc = (to_numpy(n, x) for n, x in (("q", q), ("k_cache", k_cache),
                                               ("v_cache", v_cache)))
    for name, x in (("k_cache", kc), ("v_cache", vc)):
        if not x.flags.writeable:
            raise AttentionError(f"{name}: array is read-only (it is updated in place)")
    bsz, sq, h, d = qh.shape
    nb, s_cache, hkv = kc.shape[:3]
    dv = vc.shape[3]
    dp.same([("k_cache.shape[:3]", kc.shape[:3]), ("v_cache.shape[:3]", vc.shape[:3])],
            "cache shapes")
    dp.same([("q.shape[3]", d), ("k_cache.shape[3]", kc.shape[3])], "head dims")
    paged = block_table is not None
    if (k is None) != (v is None):
        raise AttentionError("k, v: pass both or neither")
    n_new = 0
    if k is not None:
        kh, vh = to_numpy("k", k), to_numpy("v", v)
        for name, x, hd in (("k", kh, d), ("v", vh, dv)):
            want = (bsz, kh.shape[1] if kh.ndim == 4 else -1, hkv, hd)
            if x.ndim != 4 or tuple(x.shape) != want:
                raise AttentionError(f"{name}: expected shape (batch, seqlen_new, nheads_k, "
                                     f"headdim) = {want}, got {tuple(x.shape)}")
            if dp.check_float(name, x) != dt:
                raise TypeError(f"{name}: dtype {x.dtype} differs from the cache's {dt}")
        n_new = kh.shape[1]
    if paged:
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise NotImplementedError("cache_batch_idx, cache_leftpad: not supported with "
                                      "block_table (a paged cache), as in FlashAttention")
        bt = dp.host_operand("block_table", block_table, "iu", "an int32 array")
        if bt.ndim != 2 or bt.shape[0] != bsz:
            raise AttentionError(f"block_table: expected shape (batch, max_num_blocks_per_seq)"
                                 f" with batch = {bsz}, got {bt.shape}")
        row_cap = bt.shape[1] * s_cache
    else:
        row_cap = s_cache
    if cache_seqlens is None and n_new:
        raise AttentionError("cache_seqlens: required when k, v are given (where to append)")
    lens = _row_ints("cache_seqlens", cache_seqlens, bsz, 0, row_cap - n_new, row_cap)
    pad = np.zeros(bsz, np.int64)
    if cache_leftpad is not None:
        pad = _row_ints("cache_leftpad", cache_leftpad, bsz, 0, row_cap, 0)
        if (pad > lens).any():
            b = int(np.argmax(pad > lens))
            raise AttentionError(f"cache_leftpad: must be <= cache_seqlens, got "
                                 f"cache_leftpad[{b}] = {pad[b]} > {lens[b]}")
    idx = np.arange(bsz, dtype=np.int64)
    if cache_batch_idx is not None:
        idx = dp.check_int_vector("cache_batch_idx", cache_batch_idx, bsz, 0, nb - 1)
        if n_new and len(np.unique(idx)) != bsz:
            raise AttentionError("cache_batch_idx: entries must be distinct when k, v are "
                                 "appended (two rows would write one cache row)")
    elif not paged and bsz > nb:
        raise AttentionError(f"k_cache: batch_cache = {nb} is smaller than q's batch {bsz}; "
                             f"pass cache_batch_idx")
    end = lens + n_new
    if paged:
        nblk = -(-end // s_cache)
        used = np.arange(bt.shape[1])[None, :] < nblk[:, None]
        bad = used & ((bt < 0) | (bt >= nb))
        if bad.any():
            b, j = (int(i) for i in np.argwhere(bad)[0])
            raise AttentionError(f"block_table: entry [{b}, {j}] = {int(bt[b, j])} is not a "
                                 f"page in [0, {nb}) but row {b} uses {int(end[b])} keys")
    check_int("num_splits", num_splits, lo=0)
    interleaved = check_flag("rotary_interleaved", rotary_interleaved)
    ret = check_flag("return_softmax_lse", return_softmax_lse)
    cdt = dp.compute_dtype(dt)
    causal = check_flag("causal", causal)
    # the problem over the caller's storage (validates every option; nothing written yet)
    if paged:
        k_start = np.zeros(bsz, np.int64)
        table, block = np.ascontiguousarray(bt, dtype=np.int32), s_cache
    else:
        k_start = idx * s_cache + pad
        table, block = np.zeros((bsz, 1), np.int32), dp.CONTIGUOUS_BLOCK
    rows = np.zeros((bsz, 5), np.int64)
    rows[:, 0] = np.arange(bsz) * sq
    rows[:, 1] = sq
    rows[:, 2] = k_start
    rows[:, 3] = end - pad
    rows[:, 4] = end - pad - sq
    qp = dp.host("q", qh, cdt).reshape(bsz * sq, h, d)
    p = build_problem(  # k, v: shape-only stand-ins until the storage is written
        q=qp, k=np.empty((0, hkv, d), cdt), v=np.empty((0, hkv, dv), cdt), rows=rows,
        block_table=table, block_size=block,
        max_seqlen_q=sq, max_seqlen_k=int(rows[:, 3].max(initial=0)), batch=bsz,
        causal=causal, window=window_size, scale=softmax_scale,
        softcap=_softcap(softcap), alibi_slopes=alibi_slopes, bias=None, mask=None,
        sinks=None, has_kv_lens=False, out_dtype=dt)
    dp.select(p, "auto")
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise AttentionError("rotary_cos, rotary_sin: pass both or neither")
        check_tables(rotary_cos, rotary_sin, d)
        per_token = causal or p.config.window != (-1, -1)  # else every query sits at L
        qoff = np.arange(sq, dtype=np.int64) if per_token else np.zeros(sq, np.int64)
        qpos = token_positions(lens[:, None] + qoff[None, :], (bsz, sq), rotary_cos.shape[0])
        kpos = token_positions(lens[:, None] + np.arange(n_new, dtype=np.int64)[None, :],
                               (bsz, n_new), rotary_cos.shape[0]) if n_new else None

    # from here on nothing raises for bad input: rotate, write in place, attend
    if rotary:
        p.q = rotate(qp, rotary_cos, rotary_sin, qpos, interleaved)
    if n_new:
        knew = kh
        if rotary:
            k3 = dp.host("k", kh, cdt).reshape(bsz * n_new, hkv, d)
            knew = rotate(k3, rotary_cos, rotary_sin, kpos, interleaved).astype(
                dt, copy=False).reshape(kh.shape)
        pos = lens[:, None] + np.arange(n_new, dtype=np.int64)[None, :]
        if paged:
            pages = bt[np.arange(bsz)[:, None], pos // s_cache]
            kc[pages, pos % s_cache] = knew
            vc[pages, pos % s_cache] = vh
        else:
            kc[idx[:, None], pos] = knew
            vc[idx[:, None], pos] = vh
    ks = np.ascontiguousarray(kc).reshape(nb * s_cache, hkv, d)
    vs = np.ascontiguousarray(vc).reshape(nb * s_cache, hkv, dv)
    if ks.dtype not in (cdt, np.float16):  # bfloat16: converted per call, as KVCache
        ks, vs = ks.astype(cdt), vs.astype(cdt)
    p.k, p.v = ks, vs
    o, lse = run_and_finish(p, "auto", None, (bsz, sq, h, dv))
    if not ret:
        return like(q_ref, o)
    lse = np.ascontiguousarray(lse.reshape(bsz, sq, h).transpose(0, 2, 1))
    return like(q_ref, o), like(q_ref, lse)


# ---------------------------------------------------------------------------------------
# torch.nn.functional.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------
def scaled_dot_product_attention(query: Array, key: Array, value: Array,
                                 attn_mask: Array | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Array:
    """torch's ``scaled_dot_product_attention`` over :func:`numba_attn.attention`.

    Parameters
    ----------
    query : array (..., Hq, L, E)
    key : array (..., H, S, E)
    value : array (..., H, S, Ev)
        torch's layout (heads before sequence); leading axes equal. ``H == Hq`` unless
        ``enable_gqa``. numpy arrays or torch CPU tensors.
    attn_mask : bool or float array broadcastable to (..., Hq, L, S), optional
        Boolean: True = may attend. Float: added to the scores.
    dropout_p : float, default 0.0
        Must be 0.0 (``NotImplementedError`` otherwise).
    is_causal : bool, default False
        Top-left aligned (torch's rule: query ``i`` sees keys ``j <= i``); with L = 2,
        S = 5::

            1 0 0 0 0
            1 1 0 0 0

        It may be combined with ``attn_mask`` here (torch refuses the combination).
    scale : float, default 1 / sqrt(E)
    enable_gqa : bool, default False
        Let ``Hq`` be a multiple of ``H``: query head ``h`` reads kv head
        ``h // (Hq // H)`` (torch's ``repeat_interleave`` rule), without repeating k/v.

    Returns
    -------
    out : array (..., Hq, L, Ev), the kind of array ``query`` is

    Notes
    -----
    A query row whose keys are all masked gives 0 here (torch's math kernel gives NaN).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn.compat import scaled_dot_product_attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8, 5, 16), dtype=np.float32)   # (N, Hq, L, E)
    >>> kv = rng.standard_normal((2, 2, 7, 16), dtype=np.float32)  # (N, H, S, E)
    >>> scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).shape
    (2, 8, 5, 16)
    """
    _no_dropout(dropout_p)
    causal = "top_left" if check_flag("is_causal", is_causal) else False
    gqa = check_flag("enable_gqa", enable_gqa)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array (..., heads, seq, dim), got "
                            f"{type(x).__name__}")
        if len(x.shape) < 2:
            raise AttentionError(f"{name}: expected at least 2-D (..., seq, dim), got shape "
                                 f"{tuple(x.shape)}")
    qs, ks, vs = (tuple(x.shape) for x in (query, key, value))
    if not len(qs) == len(ks) == len(vs):
        raise AttentionError(f"query, key, value: ranks differ ({qs}, {ks}, {vs})")
    nd = len(qs)
    lead = qs[:-3] if nd >= 3 else ()
    hq = qs[-3] if nd >= 3 else 1
    hk = ks[-3] if nd >= 3 else 1
    for name, shp in (("key", ks), ("value", vs)):
        if shp[:-3] != lead and nd > 3:
            raise AttentionError(f"{name}: leading axes {shp[:-3]} differ from query's {lead}")
    if hk != hq and not gqa:
        raise AttentionError(f"key: {hk} heads differ from query's {hq}; pass "
                             f"enable_gqa=True for grouped-query attention")
    if gqa and hq % hk:
        raise AttentionError(f"enable_gqa: query heads ({hq}) must be a multiple of key heads "
                             f"({hk})")
    b = int(np.prod(lead, dtype=np.int64)) if lead else 1
    L, S, E, Ev = qs[-2], ks[-2], qs[-1], vs[-1]

    grad = wants_grad(query, key, value, attn_mask)  # torch autograd: stay in torch ops

    def bshd(name, x, heads, seq, dim):
        if grad:
            return x.reshape(b, heads, seq, dim).transpose(1, 2)
        return np.swapaxes(to_numpy(name, x).reshape(b, heads, seq, dim), 1, 2)

    q4 = bshd("query", query, hq, L, E)
    k4 = bshd("key", key, hk, S, ks[-1])
    v4 = bshd("value", value, vs[-3] if nd >= 3 else 1, vs[-2], Ev)
    bias = mask = None
    if attn_mask is not None and grad and attn_mask.dtype.is_floating_point:
        bias = attn_mask  # a tensor bias: its gradient flows (broadcast by attention)
        if bias.dim() > 4 or (bias.dim() > 2 and nd > 4):
            bias = bias.broadcast_to(lead + (hq, L, S)).reshape(b, hq, L, S)
    elif attn_mask is not None:
        m = dp.host_operand("attn_mask", attn_mask, "biuf", "a bool or float array")
        full = lead + (hq, L, S)
        if m.ndim > 4 or (m.ndim > 2 and nd > 4):
            try:
                m = np.broadcast_to(m, full)
            except ValueError:
                raise AttentionError(f"attn_mask: shape {m.shape} does not broadcast to "
                                     f"{full}") from None
            m = m.reshape(b, hq, L, S)
        if m.dtype == np.bool_:
            mask = m
        else:
            bias = m
    out = attention(q4, k4, v4, causal=causal, scale=scale, bias=bias, mask=mask)
    if grad:
        return out.transpose(1, 2).reshape(qs[:-1] + (Ev,))
    res = np.ascontiguousarray(np.swapaxes(out, 1, 2)).reshape(qs[:-1] + (Ev,))
    return like(query, res)
