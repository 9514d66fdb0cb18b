"""Padded batches with q_lens + kv_lens give, row by row, exactly what each unpadded row
gives alone (FlashAttention's padded semantics); kv_lens alone keeps the padded alignment."""
from __future__ import annotations

import numpy as np
import pytest
from numerics import assert_close

import numba_attn as na
from numba_attn import reference

OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "top-left": dict(causal="top_left"),
    "window": dict(causal=True, window=(2, 0)),
    "two-sided-window": dict(window=(1, 2)),
    "alibi-softcap": dict(causal=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]),
                          softcap=3.0),
    "sinks": dict(causal=True, sinks=np.array([0.5, -1.0, 0.0, 2.0])),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_padded_rows_equal_unpadded_rows(rng, opt, dtype):
    bsz, sq, sk, h, hkv, d = 3, 6, 9, 4, 2, 16
    q = rng.standard_normal((bsz, sq, h, d)).astype(dtype)
    k = rng.standard_normal((bsz, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((bsz, sk, hkv, d)).astype(dtype)
    q_lens, kv_lens = np.array([6, 2, 4]), np.array([9, 5, 3])
    kw = OPTIONS[opt]
    out, lse = na.attention(q, k, v, q_lens=q_lens, kv_lens=kv_lens, return_lse=True, **kw)
    for b in range(bsz):
        lq, lk = q_lens[b], kv_lens[b]
        alone, alone_lse = na.attention(q[b:b + 1, :lq], k[b:b + 1, :lk], v[b:b + 1, :lk],
                                        return_lse=True, **kw)
        assert_close(out[b, :lq], alone[0], dtype)  # other tilings: not bit-identical
        assert_close(lse[b, :, :lq], alone_lse[0], dtype, "lse")
        exp, exp_lse = reference.attention(q[b:b + 1, :lq], k[b:b + 1, :lk],
                                           v[b:b + 1, :lk], return_lse=True, **kw)
        assert_close(out[b, :lq], exp[0], dtype)
        assert_close(lse[b, :, :lq], exp_lse[0], dtype, "lse")
        assert np.all(out[b, lq:] == 0) and np.all(np.isneginf(lse[b, :, lq:]))


def test_bias_and_mask_index_in_row_positions(rng):
    q = rng.standard_normal((2, 4, 2, 8))
    k = rng.standard_normal((2, 6, 2, 8))
    bias = rng.standard_normal((2, 2, 4, 6))
    mask = rng.random((2, 1, 4, 6)) < 0.8
    q_lens, kv_lens = np.array([3, 4]), np.array([5, 2])
    out = na.attention(q, k, k, q_lens=q_lens, kv_lens=kv_lens, bias=bias, mask=mask,
                       causal=True)
    for b in range(2):
        lq, lk = q_lens[b], kv_lens[b]
        exp = reference.attention(q[b:b + 1, :lq], k[b:b + 1, :lk], k[b:b + 1, :lk],
                                  bias=bias[b:b + 1, :, :lq, :lk],
                                  mask=mask[b:b + 1, :, :lq, :lk], causal=True)
        assert_close(out[b, :lq], exp[0], np.float64)


def test_kv_lens_alone_keeps_the_padded_alignment(rng):
    """Documented: without q_lens the causal diagonal sits at seqlen_k - seqlen_q."""
    q = rng.standard_normal((1, 2, 1, 8))
    k = rng.standard_normal((1, 5, 1, 8))
    got = na.attention(q, k, k, causal=True, kv_lens=np.array([4]))
    exp = reference.attention(q, k, k, causal=True, kv_lens=np.array([4]))
    assert_close(got, exp, np.float64)
    aligned = na.attention(q, k, k, causal=True, kv_lens=np.array([4]), q_lens=np.array([2]))
    alone = na.attention(q, k[:, :4], k[:, :4], causal=True)
    assert_close(aligned, alone, np.float64)
    assert not np.allclose(got, aligned)


def test_q_lens_errors_and_out(rng):
    q = rng.standard_normal((2, 3, 1, 8)).astype(np.float32)
    with pytest.raises(na.AttentionError, match="q_lens"):
        na.attention(q, q, q, q_lens=np.array([4, 1]))
    with pytest.raises(TypeError, match="q_lens"):
        na.attention(q, q, q, q_lens=np.array([1.0, 1.0]))
    out = np.full((2, 3, 1, 8), 7.0, np.float32)
    na.attention(q, q, q, q_lens=np.array([1, 3]), out=out)
    assert np.all(out[0, 1:] == 0)


@pytest.mark.parametrize("opt", ["plain", "causal", "window", "alibi-softcap", "sinks"])
def test_padded_backward_equals_each_unpadded_row(rng, opt):
    """attention_backward takes q_lens like the forward: row b's gradients equal those of
    row b alone on its real lengths; padded positions get zero gradients."""
    bsz, sq, sk, h, hkv, d = 3, 7, 10, 4, 2, 16
    q = rng.standard_normal((bsz, sq, h, d))
    k = rng.standard_normal((bsz, sk, hkv, d))
    v = rng.standard_normal((bsz, sk, hkv, d))
    ql, kl = np.array([7, 3, 0]), np.array([10, 4, 6])
    kw = OPTIONS[opt]
    out, lse = na.attention(q, k, v, q_lens=ql, kv_lens=kl, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = na.attention_backward(dout, q, k, v, out, lse, q_lens=ql, kv_lens=kl, **kw)
    for b in range(bsz):
        n, m = ql[b], kl[b]
        o1, l1 = na.attention(q[b:b + 1, :n], k[b:b + 1, :m], v[b:b + 1, :m],
                              return_lse=True, **kw)
        g = na.attention_backward(dout[b:b + 1, :n], q[b:b + 1, :n], k[b:b + 1, :m],
                                  v[b:b + 1, :m], o1, l1, **kw)
        for got, want, name in zip((dq[b, :n], dk[b, :m], dv[b, :m]), g, "qkv"):
            np.testing.assert_allclose(got, want[0], rtol=1e-10, atol=1e-12, err_msg=name)
        assert not dq[b, n:].any() and not dk[b, m:].any() and not dv[b, m:].any()


def test_chunked_backward_with_q_offset(rng):
    """A chunk of queries at q_offset: its gradients equal those rows of the whole call."""
    q = rng.standard_normal((1, 12, 2, 8))
    k = rng.standard_normal((1, 12, 2, 8))
    v = rng.standard_normal((1, 12, 2, 8))
    dout = rng.standard_normal((1, 12, 2, 8))
    out, lse = na.attention(q, k, v, causal=True, return_lse=True)
    dq = na.attention_backward(dout, q, k, v, out, lse, causal=True)[0]
    c = slice(4, 8)  # a chunk of queries sitting at key positions 4..7 of 12 keys
    oc, lc = na.attention(q[:, c], k, v, causal=True, q_offset=4, return_lse=True)
    dqc = na.attention_backward(dout[:, c], q[:, c], k, v, oc, lc, causal=True, q_offset=4)[0]
    np.testing.assert_allclose(dqc, dq[:, c], rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("error")
def test_padded_half_rows_are_cleared_before_the_cast(rng):
    """Padded query rows were left uninitialised in the float32 buffer; casting them to
    float16 warned (overflow / invalid) and raised under -W error."""
    q = rng.standard_normal((2, 9, 2, 16)).astype(np.float16)
    o, lse = na.attention(q, q, q, q_lens=np.array([3, 9]), return_lse=True)
    assert not o[0, 3:].any() and np.isneginf(lse[0, :, 3:]).all()
