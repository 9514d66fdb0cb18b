"""Backward passes of the building blocks and of :class:`~numba_attn.MultiHeadAttention`.

:func:`rms_norm_backward` and :func:`apply_rotary_backward` (the gradients of
:func:`~numba_attn.rms_norm` and :func:`~numba_attn.apply_rotary`) live in norm.py and
rope.py beside their forwards and are re-exported here; ``layer.forward(x, ...,
train=True)`` records what ``layer.backward(dy)`` needs (see :func:`mha_forward_train`,
:func:`mha_backward`). Everything here is numpy over the kernels' forward and backward.
"""
from __future__ import annotations

import numpy as np

from .config import AttentionError, check_real
from .interop import Array, like, to_numpy

# the gradients of the building blocks live beside their forwards; re-exported here
from .norm import rms_norm_backward  # noqa: E402
from .rope import apply_rotary_backward  # noqa: E402

__all__ = ["apply_rotary_backward", "linear_backward", "rms_norm_backward"]


def _cdt(dt):
    return np.float64 if np.dtype(dt) == np.float64 else np.float32


def linear_backward(x, dy, w, lora=None, lora_scale=1.0):
    """Gradients of ``linear(x, w, b, lora, lora_scale)``: (dx, dw, db, dA, dB).

    ``y = x w^T + b + s (x A^T) B^T`` gives ``dw = dy^T x``, ``db = sum dy``,
    ``dx = dy w + s (dy B) A``, ``dA = s (dy B)^T x``, ``dB = s dy^T (x A^T)``
    (dA, dB None without LoRA).
    """
    n_in, n_out = x.shape[-1], dy.shape[-1]
    x2 = x.reshape(-1, n_in)
    dy2 = dy.reshape(-1, n_out)
    dw = dy2.T @ x2
    db = dy2.sum(axis=0)
    dx = dy2 @ w
    da = dbb = None
    if lora is not None:
        a, b = lora
        dyb = dy2 @ b
        dbb = lora_scale * (dy2.T @ (x2 @ a.T))
        da = lora_scale * (dyb.T @ x2)
        dx = dx + lora_scale * (dyb @ a)
    return dx.reshape(x.shape), dw, db, da, dbb


# ---------------------------------------------------------------------------------------
# MultiHeadAttention
# ---------------------------------------------------------------------------------------
def mha_forward_train(layer, x, *, context=None, positions=None, cache=None, kv_lens=None,
                      mask=None, lora=None, lora_scale=1.0, backend=None, dropout_p=0.0,
                      seed=None):
    """``layer.forward(..., train=True)``: the forward, keeping what the backward needs."""
    from .dropout import check_dropout
    from .functional import attention
    from .projections import check_hidden, check_lora, check_positions, linear
    from .norm import rms_norm

    dt = layer.dtype
    backend = layer.backend if backend is None else backend
    if cache is not None:
        raise AttentionError("cache: train=True runs without a cache (no backward through "
                             "a KV cache)")
    x_ref, x = x, check_hidden("x", x, layer.hidden_size, dt)
    bsz, sq, _ = x.shape
    src = x if context is None else check_hidden("context", context, layer.hidden_size, dt)
    if src.shape[0] != bsz:
        raise AttentionError(f"context: batch {src.shape[0]} differs from x's {bsz}")
    e, hd, h, hkv = layer.hidden_size, layer.head_dim, layer.num_heads, layer.num_kv_heads
    lo = check_lora(lora, {"q": (h * hd, e), "k": (hkv * hd, e), "v": (hkv * hd, e),
                           "o": (e, h * hd)}, dt)
    lora_scale = check_real("lora_scale", lora_scale)
    drop = check_dropout(dropout_p, seed)
    if positions is not None:
        positions = check_positions(positions, bsz, sq)
    sk = src.shape[1]
    q1 = linear(x, layer.w_q, layer.b_q, lo.get("q"), lora_scale).reshape(bsz, sq, h, hd)
    k1 = linear(src, layer.w_k, layer.b_k, lo.get("k"), lora_scale).reshape(bsz, sk, hkv, hd)
    v = linear(src, layer.w_v, layer.b_v, lo.get("v"), lora_scale).reshape(bsz, sk, hkv, hd)
    qn, kn = q1, k1
    if layer.qk_norm:
        qn = rms_norm(q1, layer.q_norm, eps=layer.norm_eps)
        kn = rms_norm(k1, layer.k_norm, eps=layer.norm_eps)
    rot = layer._rope is not None and context is None
    q2, k2 = qn, kn
    if rot:
        if positions is None:
            positions = np.broadcast_to(np.arange(sq, dtype=np.int64), (bsz, sq))
        q2 = layer._rope.rotate(qn, positions, layer.rotary_interleaved)
        k2 = layer._rope.rotate(kn, positions, layer.rotary_interleaved)
    cfg = layer.config
    opts = {"causal": cfg.causal if context is None else False,
                "window": cfg.window if context is None else (-1, -1), "scale": cfg.scale,
                "softcap": cfg.softcap, "mask": mask, "kv_lens": kv_lens, "dropout_p": drop[0],
                "seed": None if drop[0] == 0.0 else drop[1]}
    o, lse = attention(q2, k2, v, return_lse=True, backend=backend, **opts)
    of = o.reshape(bsz, sq, h * hd)
    y = linear(of, layer.w_o, layer.b_o, lo.get("o"), lora_scale)
    layer._tape = {"x": x, "src": src, "cross": context is not None, "q1": q1, "k1": k1, "qn": qn, "kn": kn,
                       "q2": q2, "k2": k2, "v": v, "o": o, "lse": lse, "of": of, "positions": positions, "rot": rot,
                       "lora": lo, "lora_scale": lora_scale, "opts": opts, "backend": backend}
    return like(x_ref, y)


def _put_linear(grads, name, res, has_bias, lora_key, lora_used):
    _, dw, db, da, dbb = res
    grads[f"{name}.weight"] = dw
    if has_bias:
        grads[f"{name}.bias"] = db
    if lora_used:
        grads[f"lora.{lora_key}.A"] = da
        grads[f"lora.{lora_key}.B"] = dbb


def mha_backward(layer, dy):
    """``layer.backward(dy)``: (dx, grads), or (dx, dcontext, grads) for cross-attention.

    ``grads`` is keyed like ``state_dict()`` (``q_proj.weight``, ..., ``o_proj.bias``,
    ``q_norm.weight``, ``k_norm.weight``); with LoRA also ``lora.<target>.A`` and
    ``lora.<target>.B`` for each LoRA target given (``q``, ``k``, ``v``, ``o``).
    """
    from .backward import attention_backward
    from .projections import check_hidden

    tape = getattr(layer, "_tape", None)
    if tape is None:
        raise AttentionError("backward: call forward(..., train=True) first")
    x, src, lo, s = tape["x"], tape["src"], tape["lora"], tape["lora_scale"]
    dy = check_hidden("dy", dy, layer.hidden_size, layer.dtype)
    if dy.shape != (x.shape[0], x.shape[1], layer.hidden_size):
        raise AttentionError(f"dy: expected shape {(x.shape[0], x.shape[1], layer.hidden_size)}"
                             f", got {dy.shape}")
    bsz, sq = x.shape[:2]
    sk = src.shape[1]
    h, hkv, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
    grads = {}
    res = linear_backward(tape["of"], dy, layer.w_o, lo.get("o"), s)
    _put_linear(grads, "o_proj", res, layer.b_o is not None, "o", "o" in lo)
    dout = res[0].reshape(bsz, sq, h, hd)
    dq2, dk2, dv = attention_backward(dout, tape["q2"], tape["k2"], tape["v"], tape["o"],
                                      tape["lse"], backend=tape["backend"], **tape["opts"])
    dqn, dkn = dq2, dk2
    if tape["rot"]:
        rope, pos = layer._rope, tape["positions"]
        cos, sin = rope.get(int(pos.max(initial=0)) + 1)
        dqn = apply_rotary_backward(dq2, cos, sin, interleaved=layer.rotary_interleaved,
                                    positions=pos)
        dkn = apply_rotary_backward(dk2, cos, sin, interleaved=layer.rotary_interleaved,
                                    positions=pos)
    dq1, dk1 = dqn, dkn
    if layer.qk_norm:
        dq1, grads["q_norm.weight"] = rms_norm_backward(dqn, tape["q1"], layer.q_norm,
                                                        eps=layer.norm_eps)
        dk1, grads["k_norm.weight"] = rms_norm_backward(dkn, tape["k1"], layer.k_norm,
                                                        eps=layer.norm_eps)
    has_b = layer.b_q is not None
    rq = linear_backward(x, dq1.reshape(bsz, sq, h * hd), layer.w_q, lo.get("q"), s)
    rk = linear_backward(src, dk1.reshape(bsz, sk, hkv * hd), layer.w_k, lo.get("k"), s)
    rv = linear_backward(src, dv.reshape(bsz, sk, hkv * hd), layer.w_v, lo.get("v"), s)
    for name, key, r in (("q_proj", "q", rq), ("k_proj", "k", rk), ("v_proj", "v", rv)):
        _put_linear(grads, name, r, has_b, key, key in lo)
    dt = layer.dtype
    grads = {k_: np.asarray(g).astype(dt, copy=False) for k_, g in grads.items()}
    dsrc = (rk[0] + rv[0]).astype(dt, copy=False)
    dx = rq[0].astype(dt, copy=False)
    if tape["cross"]:
        return dx, dsrc, grads
    return dx + dsrc, grads


# ---------------------------------------------------------------------------------------
# MultiHeadLatentAttention (naive form)
# ---------------------------------------------------------------------------------------
def mla_forward_train(layer, x, *, positions=None, cache=None, kv_lens=None, mask=None,
                      backend=None, dropout_p=0.0, seed=None):
    """``MultiHeadLatentAttention.forward(..., train=True)``: the naive form, taped."""
    from .dropout import check_dropout
    from .functional import attention
    from .projections import check_hidden, check_positions, linear
    from .norm import rms_norm

    if cache is not None:
        raise AttentionError("cache: train=True runs without a cache (no backward through "
                             "a KV cache)")
    dt, h = layer.dtype, layer.num_heads
    backend = layer.backend if backend is None else backend
    x_ref, x = x, check_hidden("x", x, layer.hidden_size, dt)
    bsz, sq, _ = x.shape
    drop = check_dropout(dropout_p, seed)
    if positions is not None:
        positions = check_positions(positions, bsz, sq)
    else:
        positions = np.broadcast_to(np.arange(sq, dtype=np.int64), (bsz, sq))
    a = an = None
    if layer.q_lora_rank is None:
        q = linear(x, layer.w_q)
    else:
        a = linear(x, layer.w_q_a, layer.b_q_a)
        an = rms_norm(a, layer.q_a_norm, eps=layer.norm_eps)
        q = linear(an, layer.w_q_b)
    q = q.reshape(bsz, sq, h, layer.qk_head_dim)
    r, dn, dr, dv = (layer.kv_lora_rank, layer.qk_nope_head_dim, layer.qk_rope_head_dim,
                     layer.v_head_dim)
    ckv = linear(x, layer.w_kv_a, layer.b_kv_a)
    c = rms_norm(ckv[..., :r], layer.kv_a_norm, eps=layer.norm_eps)
    k_pe = layer._rope.rotate(np.ascontiguousarray(ckv[..., None, r:]), positions,
                              layer.rotary_interleaved)
    q_pe = layer._rope.rotate(np.ascontiguousarray(q[..., dn:]), positions,
                              layer.rotary_interleaved)
    kv = (c @ layer.w_kv_b.T).reshape(bsz, sq, h, dn + dv)
    kk = np.concatenate([kv[..., :dn], np.broadcast_to(k_pe, (bsz, sq, h, dr))], -1)
    qq = np.concatenate([q[..., :dn], q_pe], -1)
    v = np.ascontiguousarray(kv[..., dn:])
    opts = {"causal": layer.causal, "scale": layer.scale, "kv_lens": kv_lens, "mask": mask,
                "dropout_p": drop[0], "seed": None if drop[0] == 0.0 else drop[1]}
    o, lse = attention(qq, kk, v, return_lse=True, backend=backend, **opts)
    of = o.reshape(bsz, sq, h * dv)
    y = linear(of, layer.w_o, layer.b_o)
    layer._tape = {"x": x, "a": a, "an": an, "ckv": ckv, "c": c, "qq": qq, "kk": kk, "v": v, "o": o, "lse": lse, "of": of,
                       "positions": positions, "opts": opts, "backend": backend}
    return like(x_ref, y)


def mla_backward(layer, dy):
    """``MultiHeadLatentAttention.backward(dy)``: (dx, grads keyed like state_dict())."""
    from .backward import attention_backward
    from .projections import check_hidden

    tape = getattr(layer, "_tape", None)
    if tape is None:
        raise AttentionError("backward: call forward(..., train=True) first")
    x = tape["x"]
    dy = check_hidden("dy", dy, layer.hidden_size, layer.dtype)
    if dy.shape != x.shape:
        raise AttentionError(f"dy: expected shape {x.shape}, got {dy.shape}")
    bsz, sq = x.shape[:2]
    r, dn, _dr = layer.kv_lora_rank, layer.qk_nope_head_dim, layer.qk_rope_head_dim
    grads = {}
    res = linear_backward(tape["of"], dy, layer.w_o)
    _put_linear(grads, "o_proj", res, layer.b_o is not None, None, False)
    dout = res[0].reshape(tape["o"].shape)
    dqq, dkk, dvv = attention_backward(dout, tape["qq"], tape["kk"], tape["v"], tape["o"],
                                       tape["lse"], backend=tape["backend"], **tape["opts"])
    pos = tape["positions"]
    cos, sin = layer._rope.get(int(pos.max(initial=0)) + 1)
    rot = {"interleaved": layer.rotary_interleaved, "positions": pos}
    # keys: kv = c W_kv_b^T gives (k_nope, v); the rotary key is shared by every head
    dkv = np.concatenate([dkk[..., :dn], dvv], -1).reshape(bsz * sq, -1)
    c2 = tape["c"].reshape(bsz * sq, r)
    grads["kv_b_proj.weight"] = dkv.T @ c2
    dc = (dkv @ layer.w_kv_b).reshape(bsz, sq, r)
    dkpe = apply_rotary_backward(np.ascontiguousarray(dkk[..., dn:].sum(axis=2,
                                                                         keepdims=True)),
                                 cos, sin, **rot)
    dckv_r, grads["kv_a_layernorm.weight"] = rms_norm_backward(
        dc, np.ascontiguousarray(tape["ckv"][..., :r]), layer.kv_a_norm, eps=layer.norm_eps)
    dckv = np.concatenate([dckv_r, dkpe[..., 0, :]], -1)
    rkv = linear_backward(x, dckv, layer.w_kv_a)
    _put_linear(grads, "kv_a_proj_with_mqa", rkv, layer.b_kv_a is not None, None, False)
    # queries
    dq = np.concatenate([dqq[..., :dn], apply_rotary_backward(
        np.ascontiguousarray(dqq[..., dn:]), cos, sin, **rot)], -1).reshape(bsz, sq, -1)
    if layer.q_lora_rank is None:
        rq = linear_backward(x, dq, layer.w_q)
        _put_linear(grads, "q_proj", rq, False, None, False)
        dxq = rq[0]
    else:
        rb = linear_backward(tape["an"], dq, layer.w_q_b)
        _put_linear(grads, "q_b_proj", rb, False, None, False)
        da, grads["q_a_layernorm.weight"] = rms_norm_backward(rb[0], tape["a"], layer.q_a_norm,
                                                              eps=layer.norm_eps)
        ra = linear_backward(x, da, layer.w_q_a)
        _put_linear(grads, "q_a_proj", ra, layer.b_q_a is not None, None, False)
        dxq = ra[0]
    dt = layer.dtype
    grads = {k_: np.asarray(g).astype(dt, copy=False) for k_, g in grads.items()}
    return (dxq + rkv[0]).astype(dt, copy=False), grads
