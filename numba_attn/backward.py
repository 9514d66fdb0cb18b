"""The public attention backward: :func:`attention_backward`, :func:`attention_varlen_backward`.

The same prologue as the forward (``validate`` checks, ``problem`` rows and Problem), then
``dispatch.backward`` picks the backend (its ``backward``: the CPU kernels of
``cpu/backward.py``, their CUDA twins, or ``backend="reference"``, the float64 oracle over
the caller's own arrays). Device arrays are staged through the host for now.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import dispatch
from . import validate as va
from .autograd import _probe, register, vjp_options
from .config import AttentionError, check_flag
from .dropout import check_dropout
from .interop import Array, like, like_device
from .mods import BlockMask, MaskMod, ScoreMod
from .problem import (BATCHED_LAYOUT, CONTIGUOUS_BLOCK, VARLEN_LAYOUT, batched_dims,
                      batched_rows, build_problem, varlen_dims, varlen_rows)
from . import layout as lay

__all__ = ["attention_backward", "attention_varlen_backward", "attention_vjp",
           "attention_varlen_vjp"]


def _grads(p, be, dout_p, out_p, lse_p, drop_p, seed, bias, return_dbias, return_dsinks):
    """Run the backward of ``p`` on backend ``be``; (dq, dk, dv, dbias, dsinks) packed."""
    if return_dbias and bias is None:
        raise AttentionError("return_dbias: True needs a bias")
    if return_dsinks and p.sinks is None:
        raise AttentionError("return_dsinks: True needs sinks")
    shape4 = None
    if return_dbias:
        shape4 = (1,) * (4 - len(bias.shape)) + tuple(bias.shape)
    return dispatch.backward(p, be, dout_p, out_p, lse_p, drop_p, seed, shape4)


def _with_grad(p, score_mod_grad, be, shape):
    """Attach d score_mod / d score to the Problem's mods (given, or derived: mod_grad)
    for backend ``be``, before anything runs; mask_mod / block masks need none."""
    spec = p.extra.get("mods")
    if spec is None:
        if score_mod_grad is not None:
            from .mods import ModError

            raise ModError("score_mod_grad: given without score_mod")
        return
    if not be.needs_score_mod_grad:  # the oracle differentiates the Python function itself
        return
    from . import mod_grad

    spec.sgrad = mod_grad.derivative(spec.raw[0], score_mod_grad, spec.sargs,
                                     p.compute_dtype, shape)


def _ref_mods(p, score_mod_grad):
    """The mods of the Problem as reference.*_backward keywords (none without)."""
    spec = p.extra.get("mods")
    if spec is None:
        return {}
    score_mod, sargs, mask_mod, margs = spec.raw
    return dict(score_mod=score_mod, score_mod_args=sargs, mask_mod=mask_mod,
                mask_mod_args=margs, score_mod_grad=score_mod_grad)


def check_returns(opts, return_dbias, return_dsinks):
    """(return_dbias, return_dsinks) checked against the options they need, before any run
    (vjp and autograd alike)."""
    return_dbias = check_flag("return_dbias", return_dbias)
    return_dsinks = check_flag("return_dsinks", return_dsinks)
    if return_dbias and opts.get("bias") is None:
        raise AttentionError("return_dbias: True needs a bias")
    if return_dsinks and opts.get("sinks") is None:
        raise AttentionError("return_dsinks: True needs sinks")
    return return_dbias, return_dsinks


def _finish(q, dt, shapes, grads, return_dbias, return_dsinks, bias, device):
    dq, dk, dv, dbias, dsinks = grads
    res = [np.asarray(g).reshape(s).astype(dt, copy=False) for g, s in zip((dq, dk, dv), shapes)]
    if return_dbias:
        res.append(np.asarray(dbias).reshape(tuple(bias.shape)).astype(dt, copy=False))
    if return_dsinks:
        res.append(np.asarray(dsinks).astype(dt, copy=False))
    return like_device(q, res, device)


@lay.entry("q", "k", "v", "dout", "out", result="grads")
def attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *,
                       causal: bool | str = False, window: tuple[int, int] = (-1, -1),
                       scale: float | None = None, softcap: float = 0.0,
                       alibi_slopes: Array | None = None, bias: Array | None = None,
                       mask: Array | None = None, kv_lens: Array | None = None,
                       sinks: Array | None = None, dropout_p: float = 0.0,
                       seed: int | None = None, return_dbias: bool = False,
                       return_dsinks: bool = False, backend: str = "auto",
                       q_lens: Array | None = None, q_offset: int | None = None,
                       score_mod: ScoreMod | None = None, score_mod_args: tuple = (),
                       mask_mod: MaskMod | None = None, mask_mod_args: tuple = (),
                       block_mask: BlockMask | None = None,
                       score_mod_grad: ScoreMod | None = None,
                       layout: str = "bshd") -> tuple:
    """Gradients of :func:`numba_attn.attention` (FlashAttention-2's backward).

    Scores are recomputed from ``lse`` (nothing seqlen_q x seqlen_k is stored);
    ``delta = rowsum(dout * out)``, ``ds = p (dp - delta)``; dk/dv of a kv head sum over
    the query heads of its group. Rows that see no key get zero gradients.

    Parameters
    ----------
    dout : array (batch, seqlen_q, num_heads, head_dim_v)
        Gradient of the loss with respect to the attention output.
    q, k, v : arrays as :func:`numba_attn.attention`
    out, lse : arrays
        Exactly as ``attention(..., return_lse=True)`` returned them for these inputs and
        options (the same ``dropout_p`` and ``seed``).
    causal, window, scale, softcap, alibi_slopes, bias, mask, kv_lens, q_lens, q_offset, sinks
        The options of the forward call (padded query rows of ``q_lens`` get zero
        gradients). :func:`numba_attn.attention_vjp` keeps them with the forward, so they
        cannot differ.
    dropout_p : float in [0, 1), default 0.0
    seed : int, optional
        The forward's dropout seed (required when ``dropout_p > 0``); the keep mask is
        regenerated from it.
    return_dbias : bool, default False
        Also return the gradient of ``bias``, in the shape ``bias`` was given in (broadcast
        axes summed).
    return_dsinks : bool, default False
        Also return the gradient of ``sinks``, shape (num_heads,).
    backend : {"auto", "cpu", "cuda", "reference"}, default "auto"
        "cuda" copies host arrays to the GPU and the gradients back. Device arrays run on
        the CUDA kernels and give device arrays (staged through the host for now).
    layout : {"bshd", "bhsd"}, default "bshd"
        "bhsd": dout, q, k, v and out are (batch, heads, seq, dim) and dq, dk, dv come
        back so too (transposed views); lse is (batch, heads, seqlen_q) either way.

    Returns
    -------
    dq, dk, dv : arrays of the shapes of q, k, v (dtype of q)
    dbias : array, only with ``return_dbias``
    dsinks : array (num_heads,), only with ``return_dsinks``

    Raises
    ------
    AttentionError (ValueError), TypeError, BackendUnavailable
        As :func:`numba_attn.attention`; also for dout/out/lse of the wrong shape.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 4, 8)); k = rng.standard_normal((1, 6, 2, 8))
    >>> v = rng.standard_normal((1, 6, 2, 8))
    >>> out, lse = numba_attn.attention(q, k, v, causal=True, return_lse=True)
    >>> dq, dk, dv = numba_attn.attention_backward(np.ones_like(out), q, k, v, out, lse,
    ...                                            causal=True)
    >>> dq.shape, dk.shape, dv.shape
    ((1, 4, 4, 8), (1, 6, 2, 8), (1, 6, 2, 8))
    >>> # dout = 1: dv sums each probability row, 4 queries x 2 heads per kv head
    >>> bool(np.allclose(dv.sum(axis=1), 8.0))
    True
    """
    dt, cdt, device = va.check_qkv(q, k, v, 4, *BATCHED_LAYOUT)
    return_dbias = check_flag("return_dbias", return_dbias)
    return_dsinks = check_flag("return_dsinks", return_dsinks)
    drop_p, seed_v = check_dropout(dropout_p, seed)
    bsz, sq, sk, h, hkv, d, dv = batched_dims(q, k, v)
    va.check_like((("dout", dout), ("out", out), ("lse", lse)),
                  ((bsz, sq, h, dv), (bsz, sq, h, dv), (bsz, h, sq)), device)
    rows, kl, ql = batched_rows(bsz, sq, sk, kv_lens, q_lens, q_offset, device)
    qp, kp, vp = (va.host(n, x, cdt).reshape((-1,) + tuple(x.shape[2:]))
                  for n, x in (("q", q), ("k", k), ("v", v)))
    p = build_problem(
        q=qp, k=kp, v=vp, rows=rows, block_table=np.zeros((bsz, 1), np.int32),
        block_size=CONTIGUOUS_BLOCK, max_seqlen_q=sq, max_seqlen_k=sk, batch=bsz,
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks,
        has_kv_lens=kl is not None or ql is not None, out_dtype=dt, score_mod=score_mod,
        score_mod_args=score_mod_args, mask_mod=mask_mod, mask_mod_args=mask_mod_args,
        block_mask=block_mask)
    be = dispatch.select_backward(p, backend, device)
    _with_grad(p, score_mod_grad, be, (bsz, h, sq, sk))
    dout_p = va.host("dout", dout, cdt).reshape(bsz * sq, h, dv)
    out_p = va.host("out", out, cdt).reshape(bsz * sq, h, dv)
    lse_p = np.ascontiguousarray(va.host("lse", lse, cdt).transpose(0, 2, 1)).reshape(
        bsz * sq, h)

    def oracle():
        from . import reference

        return reference.attention_backward(
            va.host("dout", dout), va.host("q", q), va.host("k", k), va.host("v", v),
            va.host("out", out), va.host("lse", lse), causal=p.config.causal,
            window=p.config.window, scale=p.config.scale, softcap=p.config.softcap,
            alibi_slopes=_host_opt("alibi_slopes", alibi_slopes),
            bias=_host_opt("bias", bias), mask=_host_opt("mask", mask), kv_lens=kl,
            sinks=p.sinks, dropout_p=drop_p, seed=seed_v, q_lens=ql, q_offset=q_offset,
            **_ref_mods(p, score_mod_grad))

    p.extra["oracle"] = oracle
    grads = _grads(p, be, dout_p, out_p, lse_p, drop_p, seed_v, bias,
                   return_dbias, return_dsinks)
    return _finish(q, dt, (q.shape, k.shape, v.shape), grads, return_dbias, return_dsinks,
                   bias, device)


def _host_opt(name, x):
    return None if x is None else va.host(name, x)


@lay.entry("q", "k", "v", "dout", "out", result="grads")
def attention_varlen_backward(dout: Array, q: Array, k: Array, v: Array, out: Array,
                              lse: Array, cu_seqlens_q: Array, cu_seqlens_k: Array, *,
                              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                              causal: bool | str = False, window: tuple[int, int] = (-1, -1),
                              scale: float | None = None, softcap: float = 0.0,
                              alibi_slopes: Array | None = None, bias: Array | None = None,
                              mask: Array | None = None, kv_lens: Array | None = None,
                              sinks: Array | None = None, dropout_p: float = 0.0,
                              seed: int | None = None, return_dbias: bool = False,
                              return_dsinks: bool = False, backend: str = "auto",
                              q_offset: int | None = None,
                              score_mod: ScoreMod | None = None, score_mod_args: tuple = (),
                              mask_mod: MaskMod | None = None, mask_mod_args: tuple = (),
                              block_mask: BlockMask | None = None,
                              score_mod_grad: ScoreMod | None = None,
                              layout: str = "bshd") -> tuple:
    """Gradients of :func:`numba_attn.attention_varlen` (packed rows).

    Parameters
    ----------
    dout, out : array (total_q, num_heads, head_dim_v)
    lse : array (num_heads, total_q)
        As ``attention_varlen(..., return_lse=True)`` returned them.
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        As :func:`numba_attn.attention_varlen`.
    causal, window, scale, softcap, alibi_slopes, bias, mask, kv_lens, q_offset, sinks,
    dropout_p, seed, return_dbias, return_dsinks, backend
        As :func:`attention_backward`; dbias positions beyond a row's lengths get zero.

    Returns
    -------
    dq, dk, dv [, dbias] [, dsinks]

    Raises
    ------
    AttentionError (ValueError), TypeError, BackendUnavailable

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((5, 2, 8)); kv = rng.standard_normal((7, 2, 8))
    >>> cu_q = np.array([0, 2, 5]); cu_k = np.array([0, 3, 7])
    >>> out, lse = numba_attn.attention_varlen(q, kv, kv, cu_q, cu_k, return_lse=True)
    >>> dq, dk, dv = numba_attn.attention_varlen_backward(np.ones_like(out), q, kv, kv, out,
    ...                                                   lse, cu_q, cu_k)
    >>> dq.shape, dk.shape
    ((5, 2, 8), (7, 2, 8))
    """
    dt, cdt, device = va.check_qkv(q, k, v, 3, *VARLEN_LAYOUT)
    return_dbias = check_flag("return_dbias", return_dbias)
    return_dsinks = check_flag("return_dsinks", return_dsinks)
    drop_p, seed_v = check_dropout(dropout_p, seed)
    tq, tk, h, hkv, d, dv = varlen_dims(q, k, v)
    va.check_like((("dout", dout), ("out", out), ("lse", lse)),
                  ((tq, h, dv), (tq, h, dv), (h, tq)), device)
    rows, cq, ck, mq, mk, kl = varlen_rows(cu_seqlens_q, cu_seqlens_k, tq, tk, max_seqlen_q,
                                           max_seqlen_k, kv_lens, q_offset)
    bsz = len(rows)
    qp, kp, vp = (va.host(n, x, cdt) for n, x in (("q", q), ("k", k), ("v", v)))
    p = build_problem(
        q=qp, k=kp, v=vp, rows=rows, block_table=np.zeros((bsz, 1), np.int32),
        block_size=CONTIGUOUS_BLOCK, max_seqlen_q=mq, max_seqlen_k=mk, batch=bsz,
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks,
        has_kv_lens=kl is not None, out_dtype=dt, score_mod=score_mod,
        score_mod_args=score_mod_args, mask_mod=mask_mod, mask_mod_args=mask_mod_args,
        block_mask=block_mask)
    be = dispatch.select_backward(p, backend, device)
    _with_grad(p, score_mod_grad, be, (bsz, h, mq, mk))
    dout_p = va.host("dout", dout, cdt)
    out_p = va.host("out", out, cdt)
    lse_p = np.ascontiguousarray(va.host("lse", lse, cdt).T)

    def oracle():
        from . import reference

        return reference.attention_varlen_backward(
            va.host("dout", dout), va.host("q", q), va.host("k", k), va.host("v", v),
            va.host("out", out), va.host("lse", lse), cq, ck, max_seqlen_q=mq,
            max_seqlen_k=mk, causal=p.config.causal, window=p.config.window,
            scale=p.config.scale, softcap=p.config.softcap,
            alibi_slopes=_host_opt("alibi_slopes", alibi_slopes),
            bias=_host_opt("bias", bias), mask=_host_opt("mask", mask), kv_lens=kl,
            q_offset=q_offset, sinks=p.sinks, dropout_p=drop_p, seed=seed_v,
            **_ref_mods(p, score_mod_grad))

    p.extra["oracle"] = oracle
    grads = _grads(p, be, dout_p, out_p, lse_p, drop_p, seed_v, bias,
                   return_dbias, return_dsinks)
    return _finish(q, dt, (q.shape, k.shape, v.shape), grads, return_dbias, return_dsinks,
                   bias, device)


@lay.entry("q", "k", "v", result="vjp")
def attention_vjp(q: Array, k: Array, v: Array, *, return_dbias: bool = False,
                  return_dsinks: bool = False, **options: Any) -> tuple:
    """Forward attention and its vector-Jacobian product, with the options kept together.

    ``out, vjp = attention_vjp(q, k, v, **options)`` runs
    ``attention(q, k, v, **options)`` and returns its output with a function ``vjp(dout)``
    that gives the gradients. The options (causal, window, masks, lengths, dropout ...)
    and the residuals (out, lse) live inside ``vjp``, so the backward cannot be called
    with other options than the forward (forgetting ``causal=True`` in a separate
    :func:`attention_backward` call silently gives other gradients).

    Parameters
    ----------
    q, k, v : arrays as :func:`numba_attn.attention`
    return_dbias : bool, default False
        ``vjp`` also returns the gradient of ``bias`` (in its given shape).
    return_dsinks : bool, default False
        ``vjp`` also returns the gradient of ``sinks``.
    **options
        Any keyword of :func:`numba_attn.attention` except ``return_lse`` and ``out``.
        ``layout="bhsd"`` holds for ``vjp`` too: its dout and gradients are BHSD.
        With ``dropout_p > 0`` and no ``seed``, a fresh seed is drawn and kept for both
        passes. ``score_mod`` needs its derivative: derived automatically (complex step,
        numba_attn.mod_grad) or given as ``score_mod_grad(score, b, h, q_idx, kv_idx,
        *score_mod_args)``; a score_mod with neither raises ModError here, before the
        forward runs. ``mask_mod`` / ``block_mask`` need none.

    Returns
    -------
    out : array (batch, seqlen_q, num_heads, head_dim_v)
    vjp : callable
        ``vjp(dout) -> (dq, dk, dv)``, then ``dbias`` and ``dsinks`` when asked for.

    Raises
    ------
    AttentionError, TypeError, BackendUnavailable
        As :func:`numba_attn.attention`, before anything runs; ``ModError`` for mods.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 5, 2, 8)) for _ in range(3))
    >>> out, vjp = numba_attn.attention_vjp(q, k, v, causal=True)
    >>> dq, dk, dv = vjp(np.ones_like(out))
    >>> ref = numba_attn.attention_backward(np.ones_like(out), q, k, v,
    ...                                     *numba_attn.attention(q, k, v, causal=True,
    ...                                                           return_lse=True),
    ...                                     causal=True)
    >>> all(np.allclose(a, b) for a, b in zip((dq, dk, dv), ref))
    True
    """
    from .functional import attention

    opts, bwd = vjp_options(options, "attention_vjp", _probe(q, k, ()))
    return_dbias, return_dsinks = check_returns(opts, return_dbias, return_dsinks)
    out, lse = attention(q, k, v, return_lse=True, **opts)

    def vjp(dout: Array) -> tuple:
        return attention_backward(dout, q, k, v, out, lse, return_dbias=return_dbias,
                                  return_dsinks=return_dsinks, **bwd)

    return out, vjp


@lay.entry("q", "k", "v", result="vjp")
def attention_varlen_vjp(q: Array, k: Array, v: Array, cu_seqlens_q: Array,
                         cu_seqlens_k: Array, *, return_dbias: bool = False,
                         return_dsinks: bool = False, **options: Any) -> tuple:
    """:func:`attention_vjp` for packed rows: ``attention_varlen`` and its vjp.

    Parameters
    ----------
    q, k, v, cu_seqlens_q, cu_seqlens_k : as :func:`numba_attn.attention_varlen`
    return_dbias, return_dsinks : bool, default False
        As :func:`attention_vjp`.
    **options
        Any keyword of :func:`numba_attn.attention_varlen` except ``return_lse`` / ``out``.

    Returns
    -------
    out : array (total_q, num_heads, head_dim_v)
    vjp : callable
        ``vjp(dout) -> (dq, dk, dv)``, then ``dbias`` / ``dsinks`` when asked for.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((7, 2, 8)) for _ in range(3))
    >>> cu = np.array([0, 3, 7], np.int32)
    >>> out, vjp = numba_attn.attention_varlen_vjp(q, k, v, cu, cu, causal=True)
    >>> [g.shape for g in vjp(np.ones_like(out))]
    [(7, 2, 8), (7, 2, 8), (7, 2, 8)]
    """
    from .functional import attention_varlen

    opts, bwd = vjp_options(options, "attention_varlen_vjp",
                            _probe(q, k, (cu_seqlens_q, cu_seqlens_k)))
    return_dbias, return_dsinks = check_returns(opts, return_dbias, return_dsinks)
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, **opts)

    def vjp(dout: Array) -> tuple:
        return attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                         return_dbias=return_dbias,
                                         return_dsinks=return_dsinks, **bwd)

    return out, vjp


register("attention", backward=attention_backward)
register("attention_varlen", backward=attention_varlen_backward)
