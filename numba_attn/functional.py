"""The public attention functions: validate once, build a Problem, dispatch, reshape.

Named by input form, as FlashAttention's interface: :func:`attention` (batched BSHD),
:func:`attention_varlen` (packed rows with ``cu_seqlens``) and :func:`merge_states`.
Each is the same four steps, with no backend branch: checks (:mod:`numba_attn.validate`),
rows and Problem (:mod:`numba_attn.problem`), a backend (:mod:`numba_attn.dispatch`),
results in the caller's array kind (:mod:`numba_attn.interop`).
"""
from __future__ import annotations

import numpy as np

from . import autograd
from . import dispatch
from . import validate as va
from .autograd import wants_grad
from .config import check_flag
from .dropout import check_dropout
from .interop import Array, like, lse_bhs, lse_ht, merge_result
from . import layout as lay
from .mods import BlockMask, MaskMod, ScoreMod
from .problem import (BATCHED_LAYOUT, CONTIGUOUS_BLOCK, VARLEN_LAYOUT, batched_dims,
                      batched_rows, build_problem, config_for, merge_operands, pack,
                      set_dropout, varlen_dims, varlen_rows)

__all__ = ["attention", "attention_varlen", "merge_states"]

# Old homes of helpers other modules import from here (now in problem / validate /
# dispatch / interop).
check_out = va.check_out
check_offset = va.check_offset
check_representable = va.check_representable
_check_cu = va.check_cu
_check_max = va.check_max
_config = config_for
run_and_finish = dispatch.run_into
_lse_bhs = lse_bhs


def canon_qkv(q, k, v, ndim, layout_q, layout_kv):
    """Rank/dtype/device checks of q, k, v: (dtype, compute dtype, device)."""
    return va.check_qkv(q, k, v, ndim, layout_q, layout_kv)


@lay.entry("q", "k", "v", "out")
def attention(q: Array, k: Array, v: Array, *, causal: bool | str = False,
              window: tuple[int, int] = (-1, -1), scale: float | None = None,
              softcap: float = 0.0, alibi_slopes: Array | None = None,
              bias: Array | None = None, mask: Array | None = None,
              kv_lens: Array | None = None, q_lens: Array | None = None,
              sinks: Array | None = None, return_lse: bool = False,
              out: Array | None = None, dropout_p: float = 0.0, seed: int | None = None,
              score_mod: ScoreMod | None = None,
              score_mod_args: tuple = (), mask_mod: MaskMod | None = None,
              mask_mod_args: tuple = (), block_mask: BlockMask | None = None,
              backend: str = "auto",
              q_offset: int | None = None,
              score_mod_grad: ScoreMod | None = None,
              layout: str = "bshd") -> Array | tuple[Array, Array]:
    """Scaled dot-product attention over batched BSHD arrays, flash-attention style.

    Parameters
    ----------
    q : array (batch, seqlen_q, num_heads, head_dim)
    k : array (batch, seqlen_k, num_kv_heads, head_dim)
    v : array (batch, seqlen_k, num_kv_heads, head_dim_v)
        float16, bfloat16, float32 or float64, one dtype for all three.
        ``num_heads % num_kv_heads == 0`` (GQA/MQA); query head ``h`` reads kv head
        ``h // (num_heads // num_kv_heads)``.
    causal : bool or {"bottom_right", "top_left"}, default False
        ``True`` = bottom-right aligned: query ``i`` sees keys ``j <= i + seqlen_k -
        seqlen_q`` (FlashAttention). ``"top_left"``: ``j <= i`` (PyTorch's ``is_causal``).
    window : (int, int), default (-1, -1)
        Sliding window (left, right) around ``i + seqlen_k - seqlen_q``; -1 means unbounded.
    scale : float, default 1 / sqrt(head_dim)
    softcap : float, default 0.0
        When > 0, scores become ``softcap * tanh(s / softcap)`` (after scaling). 0 = off.
    alibi_slopes : array (num_heads,) or (batch, num_heads), optional
        Adds ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scores.
    bias : float array broadcastable to (batch, num_heads, seqlen_q, seqlen_k), optional
        Added to the scores after softcap and ALiBi.
    mask : bool array broadcastable to (batch, num_heads, seqlen_q, seqlen_k), optional
        True = may attend.
    kv_lens : int array (batch,), optional
        Key padding: row ``b`` sees only keys ``j < kv_lens[b]``. Alone it keeps the
        alignment of the padded shapes (see Notes).
    q_lens : int array (batch,), optional
        Query padding (right-padded rows): row ``b`` has ``q_lens[b]`` real queries. With
        ``q_lens``, every row is aligned to its real lengths (``off = kv_lens[b] -
        q_lens[b]``, ``kv_lens`` defaulting to seqlen_k), so a padded batch gives, row by
        row, exactly what each unpadded row gives alone (FlashAttention's padded
        semantics); padded query rows give out 0 and lse -inf. Host arrays only.
    sinks : array (num_heads,), optional
        Attention-sink logits (natural log, unscaled): an extra ``exp(sink[h])`` in the
        softmax denominator that contributes no value.
    return_lse : bool, default False
        Also return the log-sum-exp of the scores, shape (batch, num_heads, seqlen_q).
    out : ndarray (batch, seqlen_q, num_heads, head_dim_v), optional
        Written in place and returned.
    dropout_p : float in [0, 1), default 0.0
        Attention dropout (training): probabilities are kept with probability
        ``1 - dropout_p`` and scaled by ``1 / (1 - dropout_p)`` (``lse`` is not affected).
        The keep bit of (b, h, i, j) is a pure function of (seed, b, h, i, j)
        (:mod:`numba_attn.dropout`), so :func:`attention_backward` regenerates it; CPU,
        CUDA and reference backends agree on it bit for bit. 0 runs the unchanged kernels.
    seed : int in [0, 2**63), optional
        Dropout seed, required when ``dropout_p > 0``.
    score_mod : function ``(score, b, h, q_idx, kv_idx, *score_mod_args) -> float``, optional
        Plain Python (or ``numba.njit``), compiled into the kernel; rewrites each scaled
        score before softcap, ALiBi and bias. ``h`` is the query head; ``q_idx``, ``kv_idx``
        are in-row positions. See :mod:`numba_attn.mods`.
    score_mod_args : tuple, default ()
        Arrays / scalars passed to ``score_mod`` (contents may change between calls with no
        recompile).
    score_mod_grad : function ``(score, b, h, q_idx, kv_idx, *score_mod_args) -> float``, optional
        d score_mod / d score, used only by the backward (torch autograd here; see
        :func:`numba_attn.attention_vjp`) when the automatic derivative cannot serve.
    mask_mod : function ``(b, h, q_idx, kv_idx, *mask_mod_args) -> bool``, optional
        True = may attend; combined with the other masks.
    mask_mod_args : tuple, default ()
    block_mask : BlockMask, optional
        From :func:`numba_attn.create_block_mask`: empty blocks are skipped, ``mask_mod``
        (carried by the block mask) runs only on partial ones.
    backend : {"auto", "cpu", "cuda", "reference"}, default "auto"
        "auto" runs where the data lives. Mods run on every backend (CUDA: their
        ``*_mod_args`` arrays are host arrays, copied per call).
    q_offset : int, default seqlen_k - seqlen_q
        Key position of query 0: query ``i`` sits at key position ``i + q_offset``. It
        replaces ``seqlen_k - seqlen_q`` in ``causal=True``, ``window`` and ALiBi (any int;
        ``causal="top_left"`` stays ``j <= i``). For a block of a longer sequence, e.g.
        queries ``qa:qb`` against keys ``ka:kb`` of a bottom-right call, pass
        ``qa + seqlen_k - seqlen_q - ka`` (chunked prefill, key-split context parallelism).
    layout : {"bshd", "bhsd"}, default "bshd"
        "bhsd": q, k, v and out= are (batch, heads, seq, dim) (torch's habit) and out comes
        back so too, as a transposed view (no copy of the result). See
        :mod:`numba_attn.layout`.

    Returns
    -------
    out : array (batch, seqlen_q, num_heads, head_dim_v), dtype of q
    lse : array (batch, num_heads, seqlen_q), float32 (float64 for float64 inputs)
        Only with ``return_lse``. Natural log; ``-inf`` for a query that sees no key
        (its output row is 0), or ``sinks[h]`` when sinks are given.

    Raises
    ------
    AttentionError (ValueError)
        Shapes, options or optional inputs that do not fit; the message names the argument.
    TypeError
        Unsupported or mixed dtypes.
    BackendUnavailable
        ``backend`` cannot serve the call (the message says why).

    Notes
    -----
    Order of operations (as FlashAttention-2): scale, score_mod, softcap, ALiBi and bias,
    masking (causal, window, mask, mask_mod, key padding).

    With seqlen_q = 2 and seqlen_k = 5, ``causal=True`` (bottom-right) gives::

        1 1 1 1 0
        1 1 1 1 1

    and ``causal="top_left"`` gives::

        1 0 0 0 0
        1 1 0 0 0

    ``kv_lens`` alone is key padding only: causal masks, windows and ALiBi distances stay
    aligned to the padded shapes (``off = seqlen_k - seqlen_q``), not to ``kv_lens[b]``.
    To align them to each row's real lengths (as FlashAttention does for padded batches),
    pass ``q_lens`` too (``np.full(batch, seqlen_q)`` when no query is padded), or use
    :func:`attention_varlen` on the unpadded rows.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 8, 16), dtype=np.float32)
    >>> k = rng.standard_normal((1, 6, 2, 16), dtype=np.float32)
    >>> v = rng.standard_normal((1, 6, 2, 16), dtype=np.float32)
    >>> out, lse = numba_attn.attention(q, k, v, causal=True, return_lse=True)
    >>> out.shape, lse.shape
    ((1, 4, 8, 16), (1, 8, 4))

    The last two queries alone, against all keys, with their positions kept:

    >>> tail = numba_attn.attention(q[:, 2:], k, v, causal=True, q_offset=2 + 6 - 4)
    >>> bool(np.allclose(tail, out[:, 2:], atol=1e-6))
    True

    A T5-style relative-position bias per head, read from a table passed as an argument:

    >>> table = rng.standard_normal((8, 11))            # (heads, distances -5 .. 5)
    >>> def rel_bias(score, b, h, i, j, table):
    ...     return score + table[h, min(max(j - i, -5), 5) + 5]
    >>> o = numba_attn.attention(q, k, v, score_mod=rel_bias, score_mod_args=(table,))
    >>> from numba_attn import reference
    >>> ref = reference.attention(q, k, v, score_mod=rel_bias, score_mod_args=(table,))
    >>> bool(np.allclose(o, ref, atol=1e-5))
    True
    """
    if wants_grad(q, k, v, bias, sinks):  # torch tensors requiring grad: a grad_fn
        return autograd.attention(
            q, k, v, causal=causal, window=window, scale=scale, softcap=softcap,
            alibi_slopes=alibi_slopes, bias=bias, mask=mask, kv_lens=kv_lens, q_lens=q_lens,
            sinks=sinks, return_lse=return_lse, out=out, dropout_p=dropout_p, seed=seed,
            score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
            mask_mod_args=mask_mod_args, block_mask=block_mask, backend=backend,
            q_offset=q_offset, score_mod_grad=score_mod_grad)
    dt, cdt, device = va.check_qkv(q, k, v, 4, *BATCHED_LAYOUT)
    return_lse = check_flag("return_lse", return_lse)
    dropout = check_dropout(dropout_p, seed)
    bsz, sq, sk, h, hkv, d, dv = batched_dims(q, k, v)
    out_ref, out = out, va.check_out(out, (bsz, sq, h, dv), dt, device)
    rows, kl, ql = batched_rows(bsz, sq, sk, kv_lens, q_lens, q_offset, device)
    qp, kp, vp = pack(q, k, v, cdt, device)  # device arrays stay on the device
    p = build_problem(
        q=qp, k=kp, v=vp, rows=rows, block_table=np.zeros((bsz, 1), np.int32),
        block_size=CONTIGUOUS_BLOCK, max_seqlen_q=sq, max_seqlen_k=sk, batch=bsz,
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks,
        has_kv_lens=kl is not None or ql is not None, out_dtype=dt, device=device,
        score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
        mask_mod_args=mask_mod_args, block_mask=block_mask)
    set_dropout(p, dropout)
    o, lse = dispatch.run_into(p, backend, out, (bsz, sq, h, dv))
    if ql is not None and (ql < sq).any():  # padded query rows: out 0, lse -inf
        pad = np.arange(sq)[None, :] >= ql[:, None]
        o[pad] = 0
        lse.reshape(bsz, sq, h)[pad] = -np.inf
    if out is not None:
        o = out_ref
    if not return_lse:
        return like(q, o)
    return like(q, o), like(q, lse_bhs(lse, bsz, sq, h))


@lay.entry("q", "k", "v", "out")
def attention_varlen(q: Array, k: Array, v: Array, cu_seqlens_q: Array,
                     cu_seqlens_k: Array, *, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, causal: bool | str = False,
                     window: tuple[int, int] = (-1, -1), scale: float | None = None,
                     softcap: float = 0.0, alibi_slopes: Array | None = None,
                     bias: Array | None = None, mask: Array | None = None,
                     kv_lens: Array | None = None, sinks: Array | None = None,
                     return_lse: bool = False, out: Array | None = None,
                     dropout_p: float = 0.0, seed: int | None = None,
                     score_mod: ScoreMod | None = None, score_mod_args: tuple = (),
                     mask_mod: MaskMod | None = None, mask_mod_args: tuple = (),
                     block_mask: BlockMask | None = None,
                     backend: str = "auto",
                     q_offset: int | None = None,
                     score_mod_grad: ScoreMod | None = None,
                     layout: str = "bshd") -> Array | tuple[Array, Array]:
    """Attention over packed variable-length rows (no padding), FlashAttention's varlen form.

    Parameters
    ----------
    q : array (total_q, num_heads, head_dim)
    k : array (total_k, num_kv_heads, head_dim)
    v : array (total_k, num_kv_heads, head_dim_v)
    cu_seqlens_q, cu_seqlens_k : int arrays (batch + 1,)
        Row offsets: row ``b`` owns ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` and likewise
        keys. Start at 0, non-decreasing, end at total_q / total_k. Empty rows are allowed.
    max_seqlen_q, max_seqlen_k : int, optional
        Longest row (computed when omitted); must not be smaller than the real maximum.
    bias, mask : broadcastable to (batch, num_heads, max_seqlen_q, max_seqlen_k), optional
        Indexed by in-row positions.
    kv_lens : int array (batch,), optional
        Further limits row ``b`` to its first ``kv_lens[b]`` keys.
    causal, window, scale, softcap, alibi_slopes, sinks, backend
        As in :func:`attention`; alignment is per row (``len_k[b] - len_q[b]``).
    q_offset : int, default len_k[b] - len_q[b] per row
        As in :func:`attention`: in-row query ``i`` sits at key position ``i + q_offset``
        of its row, in every row (chunked prefill of rows that share an offset).
    score_mod, score_mod_args, mask_mod, mask_mod_args, block_mask, score_mod_grad
        As in :func:`attention`; ``b`` is the segment, ``q_idx`` / ``kv_idx`` positions
        within it (a block mask covers max_seqlen_q x max_seqlen_k).
    return_lse : bool, default False
        Also return lse of shape (num_heads, total_q).
    out : ndarray (total_q, num_heads, head_dim_v), optional
    dropout_p, seed : float, int, optional
        As :func:`attention`; ``b`` of the keep mask is the row (segment) index.
    layout : {"bshd", "bhsd"}, default "bshd"
        "bhsd": q, k, v and out= are (heads, total, dim) and out comes back so too (a
        transposed view).

    Returns
    -------
    out : array (total_q, num_heads, head_dim_v); lse : array (num_heads, total_q)

    Raises
    ------
    AttentionError, TypeError, BackendUnavailable
        As :func:`attention`; also for cu_seqlens that are not monotone, do not start at 0
        or do not end at the totals.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((5, 4, 8), dtype=np.float32)   # rows of 2 and 3 queries
    >>> kv = rng.standard_normal((7, 4, 8), dtype=np.float32)  # rows of 3 and 4 keys
    >>> cu_q = np.array([0, 2, 5], np.int32); cu_k = np.array([0, 3, 7], np.int32)
    >>> numba_attn.attention_varlen(q, kv, kv, cu_q, cu_k, causal=True).shape
    (5, 4, 8)
    """
    if wants_grad(q, k, v, bias, sinks):  # torch tensors requiring grad: a grad_fn
        return autograd.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, causal=causal, window=window, scale=scale,
            softcap=softcap, alibi_slopes=alibi_slopes, bias=bias, mask=mask,
            kv_lens=kv_lens, sinks=sinks, return_lse=return_lse, out=out, dropout_p=dropout_p,
            seed=seed, score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
            mask_mod_args=mask_mod_args, block_mask=block_mask, backend=backend,
            q_offset=q_offset, score_mod_grad=score_mod_grad)
    dt, cdt, device = va.check_qkv(q, k, v, 3, *VARLEN_LAYOUT)
    return_lse = check_flag("return_lse", return_lse)
    dropout = check_dropout(dropout_p, seed)
    tq, tk, h, hkv, d, dv = varlen_dims(q, k, v)
    rows, _, _, mq, mk, kl = varlen_rows(cu_seqlens_q, cu_seqlens_k, tq, tk, max_seqlen_q,
                                         max_seqlen_k, kv_lens, q_offset)
    out_ref, out = out, va.check_out(out, (tq, h, dv), dt, device)
    qp, kp, vp = pack(q, k, v, cdt, device)
    p = build_problem(
        q=qp, k=kp, v=vp, rows=rows, block_table=np.zeros((len(rows), 1), np.int32),
        block_size=CONTIGUOUS_BLOCK, max_seqlen_q=mq, max_seqlen_k=mk, batch=len(rows),
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks,
        has_kv_lens=kl is not None, out_dtype=dt, device=device, score_mod=score_mod,
        score_mod_args=score_mod_args, mask_mod=mask_mod, mask_mod_args=mask_mod_args,
        block_mask=block_mask)
    set_dropout(p, dropout)
    o, lse = dispatch.run_into(p, backend, out, (tq, h, dv))
    if out is not None:
        o = out_ref
    if not return_lse:
        return like(q, o)
    return like(q, o), like(q, lse_ht(lse))


def merge_states(out_a: Array, lse_a: Array, out_b: Array, lse_b: Array, *,
                 backend: str = "auto") -> tuple[Array, Array]:
    """Merge two partial attention results computed over disjoint key sets.

    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse)
    out_b``; a part with ``lse = -inf`` (no visible key) is the identity, two such parts
    give ``out = 0, lse = -inf``.

    Parameters
    ----------
    out_a, out_b : array (..., seqlen, num_heads, head_dim_v)
        As :func:`attention` (batch, seqlen_q, H, Dv) or :func:`attention_varlen` (T, H, Dv).
    lse_a, lse_b : array (..., num_heads, seqlen)
        The matching log-sum-exp arrays, natural log.
    backend : {"auto", "cpu", "cuda", "reference"}, default "auto"
        "auto" merges where the arrays live (all four on one device).

    Returns
    -------
    out : array like out_a (dtype of out_a); lse : array like lse_a

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 3, 2, 8)); k = rng.standard_normal((1, 10, 2, 8))
    >>> oa, la = numba_attn.attention(q, k[:, :4], k[:, :4], return_lse=True)
    >>> ob, lb = numba_attn.attention(q, k[:, 4:], k[:, 4:], return_lse=True)
    >>> o, l = numba_attn.merge_states(oa, la, ob, lb)
    >>> bool(np.allclose(o, numba_attn.attention(q, k, k)))
    True
    """
    dt, device, lse_shape = va.check_merge(out_a, lse_a, out_b, lse_b)
    oa, la, ob, lb = merge_operands(out_a, lse_a, out_b, lse_b, va.compute_dtype(dt), device)
    o, lse = dispatch.merge(oa, la, ob, lb, device, backend)
    return merge_result(out_a, o, lse, dt, tuple(out_a.shape), lse_shape)


autograd.register("attention", forward=attention)
autograd.register("attention_varlen", forward=attention_varlen)
