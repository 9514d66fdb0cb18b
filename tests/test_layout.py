"""layout="bhsd": every entry point reads (batch, heads, seq, dim) arrays, answers in that
layout as a view, and a BHSD array passed without it is refused with the layout named."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn as na
from numba_attn import AttentionError, reference

from numerics import assert_close

F32 = np.float32


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(F32)


def bhsd(x):
    return np.ascontiguousarray(np.swapaxes(x, -3, -2))  # a C-contiguous BHSD array


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_attention_bhsd_matches_reference(rng, causal, hq, hk):
    q, k, v = randn(rng, 2, 7, hq, 16), randn(rng, 2, 9, hk, 16), randn(rng, 2, 9, hk, 24)
    got, lse = na.attention(bhsd(q), bhsd(k), bhsd(v), causal=causal, return_lse=True,
                            layout="bhsd")
    want, want_lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    assert got.shape == (2, hq, 7, 24) and lse.shape == (2, hq, 7)
    assert_close(np.swapaxes(got, 1, 2), want, F32)
    assert_close(lse, want_lse, F32)
    assert np.swapaxes(got, 1, 2).flags.c_contiguous  # a transposed view, not a copy


def test_out_argument_in_bhsd(rng):
    q, k, v = (randn(rng, 1, 5, 2, 8) for _ in range(3))
    out = np.full((1, 2, 5, 8), np.nan, F32)
    got = na.attention(bhsd(q), bhsd(k), bhsd(v), out=out, layout="bhsd")
    assert got is out or np.shares_memory(got, out)
    assert_close(np.swapaxes(out, 1, 2), reference.attention(q, k, v), F32)


def test_varlen_bhsd(rng):
    q, k, v = randn(rng, 7, 4, 8), randn(rng, 9, 2, 8), randn(rng, 9, 2, 8)
    cq, ck = np.array([0, 3, 7], np.int32), np.array([0, 4, 9], np.int32)
    got = na.attention_varlen(bhsd(q), bhsd(k), bhsd(v), cq, ck, causal=True,
                              layout="bhsd")
    want = reference.attention_varlen(q, k, v, cq, ck, causal=True)
    assert got.shape == (4, 7, 8)
    assert_close(np.swapaxes(got, 0, 1), want, F32)


def test_backward_and_vjp_bhsd(rng):
    q, k, v = randn(rng, 2, 6, 4, 8), randn(rng, 2, 5, 2, 8), randn(rng, 2, 5, 2, 8)
    dout = randn(rng, 2, 6, 4, 8)
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    want = reference.attention_backward(dout, q, k, v, out, lse, causal=True)
    got = na.attention_backward(bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out.astype(F32)),
                                lse.astype(F32), causal=True, layout="bhsd")
    for g, w in zip(got, want):
        assert g.shape == bhsd(w).shape
        assert_close(np.swapaxes(g, 1, 2), w, F32)
    o, vjp = na.attention_vjp(bhsd(q), bhsd(k), bhsd(v), causal=True, layout="bhsd")
    assert_close(np.swapaxes(o, 1, 2), out, F32)
    for g, w in zip(vjp(bhsd(dout)), want):
        assert_close(np.swapaxes(g, 1, 2), w, F32)


def test_kvcache_bhsd(rng):
    a = na.KVCache(2, 16, num_kv_heads=2, head_dim=8)
    b = na.KVCache(2, 16, num_kv_heads=2, head_dim=8)
    for _ in range(3):
        q, kn, vn = randn(rng, 2, 2, 4, 8), randn(rng, 2, 2, 2, 8), randn(rng, 2, 2, 2, 8)
        want = na.attention_with_kvcache(q, a, kn, vn, causal=True)
        got = na.attention_with_kvcache(bhsd(q), b, bhsd(kn), bhsd(vn), causal=True,
                                        layout="bhsd")
        np.testing.assert_array_equal(np.swapaxes(got, 1, 2), want)
    np.testing.assert_array_equal(a.k, b.k)  # the cache storage stays BSHD


def test_torch_autograd_bhsd(rng):
    torch = pytest.importorskip("torch")
    q, k, v = randn(rng, 1, 6, 4, 8), randn(rng, 1, 6, 2, 8), randn(rng, 1, 6, 2, 8)
    ts = [torch.tensor(bhsd(x), requires_grad=True) for x in (q, k, v)]
    out = na.attention(*ts, causal=True, layout="bhsd")
    assert out.shape == (1, 4, 6, 8)
    dout = randn(rng, 1, 6, 4, 8)
    out.backward(torch.tensor(bhsd(dout)))
    o, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    want = reference.attention_backward(dout, q, k, v, o, lse, causal=True)
    for t, w in zip(ts, want):
        assert_close(np.swapaxes(t.grad.numpy(), 1, 2), w, F32)
    # torch's own habit: a tensor transposed from BSHD storage is read without a copy
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(t.detach() for t in ts), is_causal=False, enable_gqa=True)
    got = na.attention(*(t.detach() for t in ts), layout="bhsd")
    torch.testing.assert_close(got, sdpa, rtol=1e-5, atol=1e-5)


def test_bhsd_without_layout_names_the_layout(rng):
    q, k, v = randn(rng, 2, 8, 5, 16), randn(rng, 2, 2, 7, 16), randn(rng, 2, 2, 7, 16)
    with pytest.raises(AttentionError, match="pass layout='bhsd'"):
        na.attention(q, k, v)  # BHSD arrays read as BSHD: 5 heads vs 7
    with pytest.raises(AttentionError, match="pass layout='bhsd'"):
        na.attention_backward(q, q, k, v, q, np.zeros((2, 8, 5), F32))
    with pytest.raises(AttentionError, match="layout='bshd'"):
        na.attention(bhsd(q), bhsd(k), bhsd(v), layout="bhsd")  # BSHD given as BHSD
    cache = na.KVCache(2, 16, num_kv_heads=3, head_dim=16)
    with pytest.raises(AttentionError, match="pass layout='bhsd'"):
        na.attention_with_kvcache(randn(rng, 2, 6, 2, 16), cache)  # 2 heads vs 3 kv heads
    with pytest.raises(AttentionError, match="layout: expected"):
        na.attention(q, k, v, layout="BHSD")


def test_misfit_in_both_layouts_keeps_the_native_error(rng):
    q, k = randn(rng, 1, 5, 3, 8), randn(rng, 1, 7, 2, 8)
    with pytest.raises(AttentionError) as e:
        na.attention(q, k, k)
    assert "layout" not in str(e.value)
