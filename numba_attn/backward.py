"""The public attention backward: :func:`attention_backward`, :func:`attention_varlen_backward`.

Validation mirrors the forward (the same Problem is built by ``functional.build_problem``),
then the CPU kernels of ``cpu/backward.py`` (or ``backend="reference"``, the float64 oracle)
compute the gradients; ``backend="cuda"`` (or device-array inputs) runs the CUDA twins.
Device arrays are staged through the host for now (validation and packing are numpy).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import dispatch as dp
from .config import AttentionError, BackendUnavailable, check_flag
from .autograd import _probe, register, vjp_options
from .dropout import check_dropout
from .functional import _check_cu, _check_max, batched_rows, build_problem, canon_qkv
from .interop import Array, like
from . import layout as lay

__all__ = ["attention_backward", "attention_varlen_backward", "attention_vjp",
           "attention_varlen_vjp"]


def _check_grad_inputs(dout, out, lse, out_shape, lse_shape, dt, device):
    for name, x, shape in (("dout", dout, out_shape), ("out", out, out_shape),
                           ("lse", lse, lse_shape)):
        dp.check_rank(name, x, len(shape), str(shape))
        if tuple(x.shape) != tuple(shape):
            raise AttentionError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
        dp.check_float(name, x)
        if dp.array_device(x) != device:
            raise AttentionError(f"{name}: on {dp.array_device(x)} while q, k, v are on "
                                 f"{device}; pass all arrays on the same device")


def _device_backend(device, backend):
    """Device arrays run on the CUDA kernels (copied through the host for now)."""
    if device == "cpu":
        return backend
    if backend not in ("auto", "cuda"):
        raise BackendUnavailable(f"backend {backend!r} cannot serve device arrays; use "
                                 "'auto' or 'cuda'")
    return "cuda"


def _to_device_like(q, grads):
    from numba import cuda

    from .cuda import dispatch_cuda

    return tuple(dispatch_cuda.like(q, cuda.to_device(np.ascontiguousarray(g)))
                 for g in grads)


def _run(p, dout, out, lse, drop_p, seed, bias, return_dbias, return_dsinks, backend,
         ref_call):
    if backend not in ("auto", "cpu", "reference", "cuda"):
        dp.get_backend(backend)  # unknown name: the usual error
    if backend == "cuda":
        dp._load_optional_backends()
        why = dp.BACKENDS["cuda"].unavailable_reason() if "cuda" in dp.BACKENDS else \
            "numba-cuda is not installed"
        if why:
            raise BackendUnavailable(f"backend 'cuda' cannot serve this call: {why}")
    if return_dbias and bias is None:
        raise AttentionError("return_dbias: True needs a bias")
    if return_dsinks and p.sinks is None:
        raise AttentionError("return_dsinks: True needs sinks")
    if backend == "reference":
        dq, dk, dv, dbias, dsinks = ref_call()
    else:
        if backend == "cuda":
            from .cuda import backward as kern
        else:
            from .cpu import backward as kern

        cdt = p.compute_dtype
        shape4 = None
        if return_dbias:
            shape4 = (1,) * (4 - len(bias.shape)) + tuple(bias.shape)
        dq, dk, dv, dbias, dsinks = kern.backward(p, dout.astype(cdt, copy=False),
                                                  out.astype(cdt, copy=False),
                                                  np.ascontiguousarray(lse, dtype=cdt),
                                                  drop_p, seed, shape4)
    return dq, dk, dv, dbias, dsinks


def _with_grad(p, score_mod_grad, backend, shape):
    """Attach d score_mod / d score to the Problem's mods (given, or derived: mod_grad),
    before anything runs; mask_mod / block masks need none."""
    spec = p.extra.get("mods")
    if spec is None:
        if score_mod_grad is not None:
            from .mods import ModError

            raise ModError("score_mod_grad: given without score_mod")
        return
    if backend == "reference":  # the oracle differentiates the Python function itself
        return
    if backend == "cuda":
        raise BackendUnavailable("backend 'cuda' has no backward for score_mod / mask_mod / "
                                 "block_mask yet; use backend='cpu' (host arrays)")
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


def _finish(q, dt, shapes, grads, return_dbias, return_dsinks, bias):
    dq, dk, dv, dbias, dsinks = grads
    res = [like(q, np.asarray(g).reshape(s).astype(dt, copy=False))
           for g, s in zip((dq, dk, dv), shapes)]
    if return_dbias:
        res.append(like(q, np.asarray(dbias).reshape(tuple(bias.shape)).astype(dt, copy=False)))
    if return_dsinks:
        res.append(like(q, np.asarray(dsinks).astype(dt, copy=False)))
    return tuple(res)


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
                       score_mod=None, score_mod_args: tuple = (), mask_mod=None,
                       mask_mod_args: tuple = (), block_mask=None, score_mod_grad=None,
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
    dt, cdt, device = canon_qkv(q, k, v, 4, "(batch, seqlen_q, num_heads, head_dim)",
                                "(batch, seqlen_k, num_kv_heads, head_dim)")
    return_dbias = check_flag("return_dbias", return_dbias)
    return_dsinks = check_flag("return_dsinks", return_dsinks)
    drop_p, seed_v = check_dropout(dropout_p, seed)
    bsz, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    dp.same([("q.shape[0]", bsz), ("k.shape[0]", k.shape[0]), ("v.shape[0]", v.shape[0])],
            "batch sizes")
    dp.same([("k.shape[1]", sk), ("v.shape[1]", v.shape[1])], "seqlen_k of k and v")
    dp.same([("k.shape[2]", hkv), ("v.shape[2]", v.shape[2])], "num_kv_heads of k and v")
    dp.same([("q.shape[3]", d), ("k.shape[3]", k.shape[3])], "head_dim of q and k")
    dv = v.shape[3]
    _check_grad_inputs(dout, out, lse, (bsz, sq, h, dv), (bsz, h, sq), dt, device)
    rows, kl, ql = batched_rows(bsz, sq, sk, kv_lens, q_lens, q_offset, device)
    backend = _device_backend(device, backend)
    qp = dp.host("q", q, cdt).reshape(bsz * sq, h, d)
    kp = dp.host("k", k, cdt).reshape(bsz * sk, hkv, d)
    vp = dp.host("v", v, cdt).reshape(bsz * sk, hkv, dv)
    p = build_problem(
        q=qp, k=kp, v=vp, rows=rows, block_table=np.zeros((bsz, 1), np.int32),
        block_size=dp.CONTIGUOUS_BLOCK, max_seqlen_q=sq, max_seqlen_k=sk, batch=bsz,
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks,
        has_kv_lens=kl is not None or ql is not None, out_dtype=dt, score_mod=score_mod,
        score_mod_args=score_mod_args, mask_mod=mask_mod, mask_mod_args=mask_mod_args,
        block_mask=block_mask)
    _with_grad(p, score_mod_grad, backend, (bsz, h, sq, sk))
    dout_p = dp.host("dout", dout, cdt).reshape(bsz * sq, h, dv)
    out_p = dp.host("out", out, cdt).reshape(bsz * sq, h, dv)
    lse_p = np.ascontiguousarray(dp.host("lse", lse, cdt).transpose(0, 2, 1)).reshape(
        bsz * sq, h)

    def ref_call():
        from . import reference

        return reference.attention_backward(
            dp.host("dout", dout), dp.host("q", q), dp.host("k", k), dp.host("v", v),
            dp.host("out", out), dp.host("lse", lse), causal=p.config.causal,
            window=p.config.window, scale=p.config.scale, softcap=p.config.softcap,
            alibi_slopes=None if alibi_slopes is None else dp.host("alibi_slopes",
                                                                   alibi_slopes), bias=None if
            bias is None else dp.host("bias", bias), mask=None if mask is None else
            dp.host("mask", mask), kv_lens=kl, sinks=p.sinks, dropout_p=drop_p, seed=seed_v,
            q_lens=ql, q_offset=q_offset, **_ref_mods(p, score_mod_grad))

    grads = _run(p, dout_p, out_p, lse_p, drop_p, seed_v, bias, return_dbias, return_dsinks,
                 backend, ref_call)
    res = _finish(q, dt, (q.shape, k.shape, v.shape), grads, return_dbias, return_dsinks,
                  bias)
    return res if device == "cpu" else _to_device_like(q, res)


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
                              score_mod=None, score_mod_args: tuple = (), mask_mod=None,
                              mask_mod_args: tuple = (), block_mask=None,
                              score_mod_grad=None,
                              layout: str = "bshd") -> tuple:
    """Gradients of :func:`numba_attn.attention_varlen` (packed rows).

    Parameters
    ----------
    dout, out : array (total_q, num_heads, head_dim_v)
    lse : array (num_heads, total_q)
        As ``attention_varlen(..., return_lse=True)`` returned them.
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        As :func:`numba_attn.attention_varlen`.
    causal, window, scale, softcap, alibi_slopes, bias, mask, kv_lens, sinks, dropout_p, seed,
    return_dbias, return_dsinks, backend
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
    dt, cdt, device = canon_qkv(q, k, v, 3, "(total_q, num_heads, head_dim)",
                                "(total_k, num_kv_heads, head_dim)")
    return_dbias = check_flag("return_dbias", return_dbias)
    return_dsinks = check_flag("return_dsinks", return_dsinks)
    drop_p, seed_v = check_dropout(dropout_p, seed)
    tq, h, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    dp.same([("k.shape[0]", tk), ("v.shape[0]", v.shape[0])], "total_k of k and v")
    dp.same([("k.shape[1]", hkv), ("v.shape[1]", v.shape[1])], "num_kv_heads of k and v")
    dp.same([("q.shape[2]", d), ("k.shape[2]", k.shape[2])], "head_dim of q and k")
    dv = v.shape[2]
    _check_grad_inputs(dout, out, lse, (tq, h, dv), (h, tq), dt, device)
    cq = _check_cu("cu_seqlens_q", cu_seqlens_q, tq)
    ck = _check_cu("cu_seqlens_k", cu_seqlens_k, tk)
    if len(cq) != len(ck):
        raise AttentionError(f"cu_seqlens_q and cu_seqlens_k: lengths differ ({len(cq)} vs "
                             f"{len(ck)}); both must be batch + 1")
    bsz = len(cq) - 1
    lq, lk = np.diff(cq), np.diff(ck)
    mq = _check_max("max_seqlen_q", max_seqlen_q, lq)
    mk = _check_max("max_seqlen_k", max_seqlen_k, lk)
    rows = np.zeros((bsz, 5), np.int64)
    rows[:, 0] = cq[:-1]
    rows[:, 1] = lq
    rows[:, 2] = ck[:-1]
    rows[:, 3] = lk
    rows[:, 4] = lk - lq
    kl = None
    if kv_lens is not None:
        kl = dp.check_int_vector("kv_lens", kv_lens, bsz, 0, int(lk.max(initial=0)))
        rows[:, 3] = np.minimum(lk, kl)
    backend = _device_backend(device, backend)
    qp, kp, vp = (dp.host(n, x, cdt) for n, x in (("q", q), ("k", k), ("v", v)))
    p = build_problem(
        q=qp, k=kp, v=vp, rows=rows, block_table=np.zeros((bsz, 1), np.int32),
        block_size=dp.CONTIGUOUS_BLOCK, max_seqlen_q=mq, max_seqlen_k=mk, batch=bsz,
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks,
        has_kv_lens=kl is not None, out_dtype=dt, score_mod=score_mod,
        score_mod_args=score_mod_args, mask_mod=mask_mod, mask_mod_args=mask_mod_args,
        block_mask=block_mask)
    _with_grad(p, score_mod_grad, backend, (bsz, h, mq, mk))
    dout_p = dp.host("dout", dout, cdt)
    out_p = dp.host("out", out, cdt)
    lse_p = np.ascontiguousarray(dp.host("lse", lse, cdt).T)

    def ref_call():
        from . import reference

        return reference.attention_varlen_backward(
            dp.host("dout", dout), dp.host("q", q), dp.host("k", k), dp.host("v", v),
            dp.host("out", out), dp.host("lse", lse), cq, ck, max_seqlen_q=mq,
            max_seqlen_k=mk, causal=p.config.causal, window=p.config.window,
            scale=p.config.scale, softcap=p.config.softcap, alibi_slopes=None if
            alibi_slopes is None else dp.host("alibi_slopes", alibi_slopes),
            bias=None if bias is None else
            dp.host("bias", bias), mask=None if mask is None else dp.host("mask", mask),
            kv_lens=kl, sinks=p.sinks, dropout_p=drop_p, seed=seed_v,
            **_ref_mods(p, score_mod_grad))

    grads = _run(p, dout_p, out_p, lse_p, drop_p, seed_v, bias, return_dbias, return_dsinks,
                 backend, ref_call)
    res = _finish(q, dt, (q.shape, k.shape, v.shape), grads, return_dbias, return_dsinks,
                  bias)
    return res if device == "cpu" else _to_device_like(q, res)


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
