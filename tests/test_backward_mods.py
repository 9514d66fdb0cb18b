"""The backward with user mods: score_mod (automatic or explicit derivative), mask_mod and
block masks through attention_backward, the vjps and torch autograd.

The property suite (tests/test_properties.py, operation ``backward_mods``) checks drawn
configurations against the oracle; here: a finite-difference check that does not use the
oracle's derivative, the varlen and autograd paths, and the errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import numba_attn as na
from numba_attn import reference as ref
from numba_attn.mods import ModError
from property_cases import mask_prefix, mod_leaky, mod_leaky_grad, mod_rel_tanh

RNG = np.random.default_rng(7)


def _qkv(b=1, sq=13, sk=21, h=4, hkv=2, d=16, dt=np.float64):
    return tuple(RNG.standard_normal(s).astype(dt) for s in
                 ((b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d)))


def _mods(h, b, sk):
    return dict(score_mod=mod_rel_tanh, score_mod_args=(RNG.standard_normal((h, 9)),),
                mask_mod=mask_prefix, mask_mod_args=(RNG.integers(0, sk + 1, b),))


def test_gradients_match_finite_differences_of_the_forward():
    # independent of the oracle's own derivative: <dq, u> + <dk, w> against the central
    # difference of the modded forward along (u, w)
    q, k, v = _qkv(b=2)
    kw = dict(causal=True, softcap=30.0, **_mods(4, 2, 21))
    out, vjp = na.attention_vjp(q, k, v, **kw)
    dout = RNG.standard_normal(out.shape)
    dq, dk, dv = vjp(dout)
    u, w = RNG.standard_normal(q.shape), RNG.standard_normal(k.shape)
    eps = 1e-6

    def loss(t):
        return float((na.attention(q + t * u, k + t * w, v, **kw) * dout).sum())

    fd = (loss(eps) - loss(-eps)) / (2 * eps)
    assert fd == pytest.approx(float((dq * u).sum() + (dk * w).sum()), rel=1e-6, abs=1e-8)
    r = ref.attention_backward(dout, q, k, v, *na.attention(q, k, v, return_lse=True, **kw),
                               **kw)
    for got, exact in zip((dq, dk, dv), r):
        np.testing.assert_allclose(got, exact, atol=1e-12)


def test_explicit_derivative_and_backward_entry_points_agree():
    q, k, v = _qkv(dt=np.float32)
    kw = dict(score_mod=mod_leaky, score_mod_args=(0.1,))
    out, lse = na.attention(q, k, v, return_lse=True, **kw)
    dout = RNG.standard_normal(out.shape).astype(np.float32)
    got = na.attention_backward(dout, q, k, v, out, lse, score_mod_grad=mod_leaky_grad, **kw)
    exact = ref.attention_backward(dout, q, k, v, out, lse, score_mod_grad=mod_leaky_grad,
                                   **kw)
    for g, e in zip(got, exact):
        np.testing.assert_allclose(g, e, atol=2e-5)
    # forgetting the derivative of a score_mod that has no automatic one: an error, not
    # silently wrong gradients
    with pytest.raises(ModError, match="score_mod: mod_leaky cannot be differentiated"):
        na.attention_backward(dout, q, k, v, out, lse, **kw)


def test_block_mask_backward_equals_mask_mod_backward():
    q, k, v = _qkv(sq=40, sk=40)
    prefix = np.array([5])
    bm = na.create_block_mask(mask_prefix, 1, 1, 40, 40, mask_mod_args=(prefix,),
                              block_size=8)
    out, vjp = na.attention_vjp(q, k, v, block_mask=bm)
    dout = RNG.standard_normal(out.shape)
    o, lse = na.attention(q, k, v, return_lse=True, mask_mod=mask_prefix,
                          mask_mod_args=(prefix,))
    exact = ref.attention_backward(dout, q, k, v, o, lse, mask_mod=mask_prefix,
                                   mask_mod_args=(prefix,))
    for g, e in zip(vjp(dout), exact):
        np.testing.assert_allclose(g, e, atol=1e-12)


def test_varlen_vjp_with_mods():
    cu_q = np.array([0, 5, 5, 17], np.int32)
    cu_k = np.array([0, 9, 12, 30], np.int32)
    q = RNG.standard_normal((17, 4, 16))
    k, v = (RNG.standard_normal((30, 2, 16)) for _ in range(2))
    kw = dict(causal=True, **_mods(4, 3, 18))
    out, vjp = na.attention_varlen_vjp(q, k, v, cu_q, cu_k, **kw)
    dout = RNG.standard_normal(out.shape)
    o, lse = ref.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    np.testing.assert_allclose(out, o, atol=1e-12)
    exact = ref.attention_varlen_backward(dout, q, k, v, o, lse, cu_q, cu_k, **kw)
    for g, e in zip(vjp(dout), exact):
        np.testing.assert_allclose(g, e, atol=1e-12)


def _math_exp_mod(score, b, h, i, j):
    return math.exp(score / 4.0)  # math.*: no complex form in Numba


def _abs_mod(score, b, h, i, j):
    return abs(score)  # compiles for complex, but |z| is not the derivative


def _bool_grad(score, b, h, i, j, slope):
    return score > 0


def test_a_mod_without_derivative_fails_before_anything_runs():
    q, k, v = _qkv(sq=3, sk=4)
    with pytest.raises(ModError, match="score_mod: _math_exp_mod cannot be differentiated "
                                       "automatically.*score_mod_grad"):
        na.attention_vjp(q, k, v, score_mod=_math_exp_mod)
    with pytest.raises(ModError, match="automatic derivative of _abs_mod .*finite "
                                       "differences.*score_mod_grad"):
        na.attention_vjp(q, k, v, score_mod=_abs_mod)
    out, lse = na.attention(q, k, v, return_lse=True)
    with pytest.raises(ModError, match="score_mod_grad: given without score_mod"):
        na.attention_backward(out, q, k, v, out, lse, score_mod_grad=mod_leaky_grad)
    with pytest.raises(ModError, match="score_mod_grad: .*returns bool"):
        na.attention_vjp(q, k, v, score_mod=mod_leaky, score_mod_args=(0.1,),
                         score_mod_grad=_bool_grad)


def test_torch_autograd_through_a_modded_attention():
    torch = pytest.importorskip("torch")
    q, k, v = _qkv()
    kw = _mods(4, 1, 21)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    o = na.attention(tq, tk, tv, causal=True, **kw)
    assert o.grad_fn is not None
    dout = RNG.standard_normal(o.shape)
    o.backward(torch.tensor(dout))
    out, vjp = na.attention_vjp(q, k, v, causal=True, **kw)
    np.testing.assert_allclose(o.detach().numpy(), out, atol=1e-13)
    for t, g in zip((tq, tk, tv), vjp(dout)):
        np.testing.assert_allclose(t.grad.numpy(), g, atol=1e-13)
    # an explicit derivative reaches the backward through attention(..., score_mod_grad=)
    tq.grad = None
    o = na.attention(tq, tk, tv, score_mod=mod_leaky, score_mod_args=(0.1,),
                     score_mod_grad=mod_leaky_grad)
    o.backward(torch.tensor(dout))
    out, lse = na.attention(q, k, v, return_lse=True, score_mod=mod_leaky,
                            score_mod_args=(0.1,))
    exact = ref.attention_backward(dout, q, k, v, out, lse, score_mod=mod_leaky,
                                   score_mod_args=(0.1,), score_mod_grad=mod_leaky_grad)
    np.testing.assert_allclose(tq.grad.numpy(), exact[0], atol=1e-12)
