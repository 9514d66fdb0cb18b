"""The training forward and the backward of :class:`~numba_attn.MultiHeadAttention`:
``layer.forward(x, ..., train=True)`` records on ``layer._tape`` what ``layer.backward(dy)``
needs. numpy over the kernels' forward and backward.
"""
from __future__ import annotations

import numpy as np

from ..config import AttentionError, check_real
from ..interop import like
from ..norm import rms_norm_backward
from ..rope import apply_rotary_backward
from .projections import (_put_linear, check_hidden, check_lora, check_positions, linear,
                          linear_backward)

__all__ = ["mha_forward_train", "mha_backward"]


def mha_forward_train(layer, x, *, context=None, positions=None, cache=None, kv_lens=None,
                      mask=None, lora=None, lora_scale=1.0, backend=None, dropout_p=0.0,
                      seed=None):
    """``layer.forward(..., train=True)``: the forward, keeping what the backward needs."""
    from ..dropout import check_dropout
    from ..functional import attention
    from ..norm import rms_norm

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
        q2, k2, positions = layer._rotate_qk(qn, kn, positions, bsz, sq)
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


def mha_backward(layer, dy):
    """``layer.backward(dy)``: (dx, grads), or (dx, dcontext, grads) for cross-attention.

    ``grads`` is keyed like ``state_dict()`` (``q_proj.weight``, ..., ``o_proj.bias``,
    ``q_norm.weight``, ``k_norm.weight``); with LoRA also ``lora.<target>.A`` and
    ``lora.<target>.B`` for each LoRA target given (``q``, ``k``, ``v``, ``o``).
    """
    from ..backward import attention_backward

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
