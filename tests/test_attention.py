"""Every attention option and combination against the float64 oracle (reference.py)."""
from __future__ import annotations

import numpy as np
import pytest
from numerics import assert_close

import numba_attn as na
from numba_attn import reference as ref

# name: (batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v)
SHAPES = {
    "mha": (2, 17, 17, 4, 4, 32, 32),
    "gqa-q<k": (2, 33, 97, 8, 2, 64, 64),
    "mqa-q>k": (1, 97, 33, 4, 1, 40, 40),
    "decode": (3, 1, 130, 8, 2, 128, 128),
    "d59": (1, 20, 21, 2, 1, 59, 59),
    "d256": (1, 9, 70, 2, 2, 256, 256),
    "dv-differs": (1, 13, 40, 4, 2, 48, 24),
    "tiles": (1, 300, 290, 2, 2, 16, 16),
    "seqlen1": (2, 1, 1, 2, 1, 8, 8),
}
BIG = (1, 200, 300, 4, 2, 64, 64)  # several query blocks and key tiles


def _options(name, rng, b, sq, sk, h):
    """Keyword options for a named option set (random inputs drawn from ``rng``)."""
    r = rng
    return {
        "plain": {},
        "causal": dict(causal=True),
        "top_left": dict(causal="top_left"),
        "window_left": dict(window=(5, -1)),
        "window_right": dict(window=(-1, 3)),
        "window_both": dict(window=(4, 2)),
        "window_zero": dict(window=(0, 0)),
        "causal_window": dict(causal=True, window=(7, 0)),
        "softcap": dict(softcap=1.5),
        "alibi_heads": dict(alibi_slopes=r.uniform(0.01, 0.5, h)),
        "alibi_batch": dict(alibi_slopes=r.uniform(0.01, 0.5, (b, h)), causal=True),
        "bias_full": dict(bias=r.standard_normal((b, h, sq, sk))),
        "bias_keys": dict(bias=r.standard_normal((b, 1, 1, sk))),
        "bias_2d": dict(bias=r.standard_normal((sq, sk))),
        "bias_heads": dict(bias=r.standard_normal((h, 1, sk))),
        "mask_full": dict(mask=r.random((b, h, sq, sk)) > 0.3),
        "mask_2d": dict(mask=r.random((sq, sk)) > 0.5),
        "mask_keys": dict(mask=r.random((b, 1, 1, sk)) > 0.2),
        "kv_lens": dict(kv_lens=r.integers(0, sk + 1, b)),
        "kv_lens_zero": dict(kv_lens=np.zeros(b, np.int32)),
        "sinks": dict(sinks=r.standard_normal(h)),
        "sinks_empty_rows": dict(sinks=r.standard_normal(h), causal="top_left", window=(0, 0),
                                 kv_lens=np.zeros(b, np.int64)),
        "everything": dict(causal=True, window=(9, -1), softcap=3.0,
                           alibi_slopes=r.uniform(0.01, 0.2, h),
                           bias=r.standard_normal((1, h, sq, sk)),
                           mask=r.random((b, 1, sq, sk)) > 0.2,
                           kv_lens=r.integers(0, sk + 1, b), sinks=r.standard_normal(h),
                           scale=0.3),
    }[name]


OPTION_NAMES = ["plain", "causal", "top_left", "window_left", "window_right", "window_both",
                "window_zero", "causal_window", "softcap", "alibi_heads", "alibi_batch",
                "bias_full", "bias_keys", "bias_2d", "bias_heads", "mask_full", "mask_2d",
                "mask_keys", "kv_lens", "kv_lens_zero", "sinks", "sinks_empty_rows",
                "everything"]


def make_qkv(rng, shape, dtype):
    b, sq, sk, h, hkv, d, dv = shape
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hkv, dv)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("opt", OPTION_NAMES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_cpu_matches_reference(rng, shape_name, opt, dtype):
    shape = SHAPES[shape_name]
    q, k, v = make_qkv(rng, shape, dtype)
    kw = _options(opt, rng, shape[0], shape[1], shape[2], shape[3])
    got, got_lse = na.attention(q, k, v, return_lse=True, backend="cpu", **kw)
    expected, expected_lse = ref.attention(q, k, v, return_lse=True, **kw)
    assert got.dtype == dtype and got.shape == expected.shape
    assert got_lse.dtype == dtype
    assert_close(got, expected, dtype)
    assert_close(got_lse, expected_lse, dtype, "lse")


@pytest.mark.parametrize("opt", ["plain", "causal", "everything"])
def test_reference_backend_agrees(rng, opt):
    """backend="reference" (dispatch path) equals reference.attention (direct oracle)."""
    shape = SHAPES["gqa-q<k"]
    q, k, v = make_qkv(rng, shape, np.float64)
    kw = _options(opt, rng, *shape[:4])
    got, got_lse = na.attention(q, k, v, return_lse=True, backend="reference", **kw)
    expected, expected_lse = ref.attention(q, k, v, return_lse=True, **kw)
    assert_close(got, expected, np.float64)
    assert_close(got_lse, expected_lse, np.float64, "lse")


@pytest.mark.parametrize("opt", ["plain", "causal", "everything"])
@pytest.mark.parametrize("shape_name", ["mha", "decode", "tiles"])
def test_float16_computed_in_float32(rng, shape_name, opt):
    shape = SHAPES[shape_name]
    q, k, v = make_qkv(rng, shape, np.float16)
    kw = _options(opt, rng, *shape[:4])
    got, lse = na.attention(q, k, v, return_lse=True, **kw)
    expected, expected_lse = ref.attention(q, k, v, return_lse=True, **kw)
    assert got.dtype == np.float16 and lse.dtype == np.float32
    assert_close(got, expected, np.float16)
    assert_close(lse, expected_lse, np.float16, "lse")


def _naive(q, k, v, causal):
    """Textbook attention in the inputs' own precision (materialises the score matrix)."""
    dt = q.dtype
    h, hkv = q.shape[2], k.shape[2]
    kk = np.repeat(k, h // hkv, axis=2)
    vv = np.repeat(v, h // hkv, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, kk) * dt.type(1 / np.sqrt(q.shape[3]))
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        vis = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq
        s = np.where(vis, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p, vv)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape_name", ["gqa-q<k", "big", "d256"])
def test_error_within_twice_naive_float32(rng, shape_name, causal):
    """FlashAttention's bound: kernel error <= 2 x error of naive float32 (+ float32 eps)."""
    q, k, v = make_qkv(rng, BIG if shape_name == "big" else SHAPES[shape_name], np.float32)
    expected = ref.attention(q, k, v, causal=causal)
    naive_err = np.abs(_naive(q, k, v, causal) - expected).max()
    got_err = np.abs(na.attention(q, k, v, causal=causal) - expected).max()
    assert got_err <= 2 * naive_err + 1e-6, (got_err, naive_err)


def test_causal_bottom_right_picture():
    """The docstring's mask picture: seqlen_q=2, seqlen_k=5 (1 = attends)."""
    q = np.zeros((1, 2, 1, 4))
    k = np.zeros((1, 5, 1, 4))
    v = np.eye(5).reshape(1, 5, 1, 5)  # out[i] = softmax row i: reveals the mask
    br = na.attention(q, k, v, causal=True)[0, :, 0] > 0
    tl = na.attention(q, k, v, causal="top_left")[0, :, 0] > 0
    np.testing.assert_array_equal(br, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(tl, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])


def test_empty_rows_give_zero_and_minus_inf(rng):
    q, k, v = make_qkv(rng, (1, 4, 6, 2, 1, 8, 8), np.float32)
    out, lse = na.attention(q, k, v, return_lse=True, kv_lens=np.array([0]))
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0.0)
    assert np.all(np.isneginf(lse))
    sinks = np.array([0.5, -1.0])
    out, lse = na.attention(q, k, v, return_lse=True, kv_lens=np.array([0]), sinks=sinks)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_allclose(lse[0], np.broadcast_to(sinks[:, None], (2, 4)))


def test_out_argument_is_filled_and_returned(rng):
    q, k, v = make_qkv(rng, SHAPES["mha"], np.float32)
    out = np.full(q.shape, np.nan, np.float32)
    got = na.attention(q, k, v, causal=True, out=out)
    assert got is out
    assert_close(out, ref.attention(q, k, v, causal=True), np.float32)
    out16 = np.full(q.shape, np.nan, np.float16)
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    got16 = na.attention(q16, k16, v16, out=out16)
    assert got16 is out16  # the float16 out= is written through the float32 result
    assert_close(out16, ref.attention(q16, k16, v16), np.float16)
    np.testing.assert_array_equal(out16, na.attention(q16, k16, v16))


def test_large_scores_do_not_overflow(rng):
    """Logits in the hundreds (scale 50) stay accurate: the online max shift works.

    float32 rounding of logits that large is itself ~1e-4 (the naive float32 error is of
    the same order), so the bound scales with float32 eps x the largest logit.
    """
    q, k, v = make_qkv(rng, BIG, np.float32)
    expected, lse = ref.attention(q, k, v, scale=50.0, causal=True, return_lse=True)
    got = na.attention(q, k, v, scale=50.0, causal=True)
    assert np.abs(lse).max() > 300  # exp would overflow float32 without the shift
    bound = 64 * np.finfo(np.float32).eps * np.abs(lse).max()
    assert np.abs(got - expected).max() <= bound


def test_bfloat16_if_available(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = make_qkv(rng, SHAPES["mha"], np.float32)
    bf = [x.astype(ml_dtypes.bfloat16) for x in (q, k, v)]
    got = na.attention(*bf, causal=True)
    assert got.dtype == ml_dtypes.bfloat16
    expected = ref.attention(*[x.astype(np.float32) for x in bf], causal=True)
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=2e-2, rtol=2e-2)
