"""attention_vjp / attention_varlen_vjp: the options live with the residuals, so the
backward cannot differ from the forward."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn as na
from numba_attn import reference
from numba_attn.mods import ModError

OPTIONS = {
    "causal": dict(causal=True),
    "window-softcap": dict(causal="top_left", window=(3, 0), softcap=5.0),
    "padded": dict(q_lens=np.array([5, 2]), kv_lens=np.array([9, 3]), causal=True),
    "chunk": dict(q_offset=2, causal=True),
    "dropout": dict(dropout_p=0.3, seed=11),
}


def _inputs(rng, sq=5, sk=9):
    return (rng.standard_normal((2, sq, 4, 8)), rng.standard_normal((2, sk, 2, 8)),
            rng.standard_normal((2, sk, 2, 8)))


@pytest.mark.parametrize("name", OPTIONS)
def test_vjp_equals_the_oracle_with_the_forwards_options(rng, name):
    q, k, v = _inputs(rng)
    kw = OPTIONS[name]
    out, vjp = na.attention_vjp(q, k, v, **kw)
    dout = rng.standard_normal(out.shape)
    exp_out, lse = reference.attention(q, k, v, return_lse=True, **kw)
    np.testing.assert_allclose(out, exp_out, rtol=1e-10, atol=1e-12)
    expected = reference.attention_backward(dout, q, k, v, out, lse, **kw)
    for got, want, what in zip(vjp(dout), expected, "qkv"):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg="d" + what)


def test_vjp_returns_dbias_and_dsinks_when_asked(rng):
    q, k, v = _inputs(rng)
    bias = rng.standard_normal((1, 4, 5, 9))
    sinks = rng.standard_normal(4)
    out, vjp = na.attention_vjp(q, k, v, bias=bias, sinks=sinks, return_dbias=True,
                                return_dsinks=True)
    dout = rng.standard_normal(out.shape)
    _, lse = reference.attention(q, k, v, bias=bias, sinks=sinks, return_lse=True)
    exp = reference.attention_backward(dout, q, k, v, out, lse, bias=bias, sinks=sinks)
    got = vjp(dout)
    assert len(got) == 5 and got[3].shape == bias.shape and got[4].shape == (4,)
    for g, e in zip(got, exp):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-11)


def test_dropout_without_a_seed_uses_one_seed_for_both_passes(rng):
    """out is linear in v: <dout, out> == <dv, v> holds only if the backward drops the very
    keys the forward dropped."""
    q, k, v = _inputs(rng)
    out, vjp = na.attention_vjp(q, k, v, dropout_p=0.4)
    dout = rng.standard_normal(out.shape)
    dv = vjp(dout)[2]
    assert np.isclose(np.sum(dout * out), np.sum(dv * v), rtol=1e-10)
    out2, _ = na.attention_vjp(q, k, v, dropout_p=0.4)
    assert not np.allclose(out, out2)  # a fresh seed per call


def test_varlen_vjp_equals_the_oracle(rng):
    cu_q, cu_k = np.array([0, 3, 3, 8], np.int32), np.array([0, 4, 6, 13], np.int32)
    q = rng.standard_normal((8, 4, 8))
    k = rng.standard_normal((13, 2, 8))
    v = rng.standard_normal((13, 2, 8))
    out, vjp = na.attention_varlen_vjp(q, k, v, cu_q, cu_k, causal=True, softcap=3.0)
    dout = rng.standard_normal(out.shape)
    _, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, softcap=3.0,
                                        return_lse=True)
    exp = reference.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                              causal=True, softcap=3.0)
    for g, e in zip(vjp(dout), exp):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["score_mod", "mask_mod", "block_mask"])
def test_bad_mods_are_refused_naming_them(rng, name):
    # the vjps take mods (tests/test_backward_mods.py); what is not a mod is refused
    q, k, v = _inputs(rng)
    with pytest.raises(na.AttentionError, match=name):
        na.attention_vjp(q, k, v, **{name: object()})


@pytest.mark.parametrize("name", ["return_lse", "out"])
def test_residual_keywords_are_refused(rng, name):
    q, k, v = _inputs(rng)
    with pytest.raises(TypeError, match=name):
        na.attention_vjp(q, k, v, **{name: True})


def test_return_dbias_needs_a_bias(rng):
    q, k, v = _inputs(rng)
    with pytest.raises(na.AttentionError, match="return_dbias"):
        na.attention_vjp(q, k, v, return_dbias=True)
