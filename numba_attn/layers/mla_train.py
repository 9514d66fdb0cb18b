"""The training forward (the naive form) and the backward of
:class:`~numba_attn.MultiHeadLatentAttention`, taped as in mha_train.py.
"""
from __future__ import annotations

import numpy as np

from ..config import AttentionError
from ..interop import like
from ..norm import rms_norm_backward
from ..rope import apply_rotary_backward
from .projections import (_put_linear, check_hidden, check_positions, linear,
                          linear_backward)

__all__ = ["mla_forward_train", "mla_backward"]


def mla_forward_train(layer, x, *, positions=None, cache=None, kv_lens=None, mask=None,
                      backend=None, dropout_p=0.0, seed=None):
    """``MultiHeadLatentAttention.forward(..., train=True)``: the naive form, taped."""
    from ..dropout import check_dropout
    from ..functional import attention
    from ..norm import rms_norm

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
    from ..backward import attention_backward

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
