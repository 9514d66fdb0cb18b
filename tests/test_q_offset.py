"""``attention(..., q_offset=)``: an explicit alignment (query i sits at key position i + q_offset).

Checked two ways: against reference.py with the same offset, and, independently of any
offset code in the oracle, as a slice of a whole call (a query block with its own offset
equals those rows of the whole sequence; key blocks merged with the lse rule equal the whole).
``attention_varlen(..., q_offset=)`` (and its backward and vjp) aligns every packed row so:
against the varlen oracle, and row by row against the batched call with the same offset.
"""
from __future__ import annotations

import numpy as np
import pytest
from numerics import assert_close

import numba_attn as na
from numba_attn import reference as ref

# (batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim)
SHAPES = {"gqa": (2, 19, 41, 4, 2, 16), "decode": (2, 1, 70, 4, 1, 32)}
OPTIONS = {
    "causal": dict(causal=True),
    "window": dict(window=(6, 2)),
    "causal_window_alibi": dict(causal=True, window=(9, -1), alibi_slopes=[0.1, 0.2, 0.3, 0.4]),
    "top_left_window": dict(causal="top_left", window=(3, 4)),
    "causal_kv_lens_softcap": dict(causal=True, kv_lens=np.array([30, 5]), softcap=2.0),
}


def _qkv(rng, shape, dtype):
    b, sq, sk, h, hkv, d = shape
    return (rng.standard_normal((b, sq, h, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("offset", [-60, -7, 0, 5, 22, 100])
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_matches_reference(rng, shape_name, opt, offset, dtype):
    q, k, v = _qkv(rng, SHAPES[shape_name], dtype)
    kw = OPTIONS[opt]
    got, got_lse = na.attention(q, k, v, q_offset=offset, return_lse=True, backend="cpu", **kw)
    expected, expected_lse = ref.attention(q, k, v, q_offset=offset, return_lse=True, **kw)
    assert_close(got, expected, dtype)
    assert_close(got_lse, expected_lse, dtype, "lse")


@pytest.mark.parametrize("kw, base", [
    (dict(causal=True), "bottom_right"),
    (OPTIONS["causal_window_alibi"], "bottom_right"),
    (OPTIONS["window"], "bottom_right"),
    (dict(causal="top_left"), "top_left"),
], ids=["causal", "causal_window_alibi", "window", "top_left"])
def test_query_block_is_a_slice_of_the_whole(rng, kw, base):
    """Rows qa:qb with q_offset = qa + Sk - Sq equal those rows of the whole call.

    top_left aligns the causal rule at 0: as a bottom-right call, its block offset is qa.
    """
    q, k, v = _qkv(rng, SHAPES["gqa"], np.float64)
    sq, sk = q.shape[1], k.shape[1]
    whole, whole_lse = ref.attention(q, k, v, return_lse=True, **kw)  # no q_offset
    block_kw = dict(kw, causal=True) if base == "top_left" else kw
    shift = 0 if base == "top_left" else sk - sq
    for qa, qb in [(0, 4), (4, 11), (11, sq)]:
        got, got_lse = na.attention(q[:, qa:qb], k, v, q_offset=qa + shift, return_lse=True,
                                    **block_kw)
        assert_close(got, whole[:, qa:qb], np.float64)
        assert_close(got_lse, whole_lse[:, :, qa:qb], np.float64, "lse")


def test_key_blocks_merge_to_the_whole(rng):
    """Each key block ka:kb with q_offset = Sk - Sq - ka, merged by merge_states, is the whole."""
    q, k, v = _qkv(rng, SHAPES["gqa"], np.float64)
    kw = dict(causal=True, window=(12, -1), alibi_slopes=np.array([0.1, 0.2, 0.3, 0.4]))
    sq, sk = q.shape[1], k.shape[1]
    whole, whole_lse = ref.attention(q, k, v, return_lse=True, **kw)
    o = np.zeros_like(whole)
    lse = np.full_like(whole_lse, -np.inf)
    for ka, kb in [(0, 9), (9, 30), (30, sk)]:
        ob, lb = na.attention(q, k[:, ka:kb], v[:, ka:kb], q_offset=sk - sq - ka,
                              return_lse=True, **kw)
        o, lse = na.merge_states(o, lse, ob, lb)
    assert_close(o, whole, np.float64)
    assert_close(lse, whole_lse, np.float64, "lse")


@pytest.mark.parametrize("bad, err", [(True, TypeError), (1.0, TypeError), ("3", TypeError),
                                      (2**41, ValueError)])
def test_bad_offset_is_rejected(rng, bad, err):
    q, k, v = _qkv(rng, SHAPES["gqa"], np.float32)
    out = np.zeros((2, 19, 4, 16), np.float32)
    with pytest.raises(err, match="q_offset"):
        na.attention(q, k, v, causal=True, q_offset=bad, out=out)
    assert not out.any()


def test_numpy_int_accepted(rng):
    q, k, v = _qkv(rng, SHAPES["gqa"], np.float64)
    got = na.attention(q, k, v, causal=True, q_offset=np.int32(3))
    assert_close(got, ref.attention(q, k, v, causal=True, q_offset=3), np.float64)


# packed rows (lengths 0 and 1 included) for the varlen q_offset
VARLEN_LENS = ([3, 0, 7, 1], [9, 4, 5, 12])


def _packed(rng, dtype, h=4, hkv=2, d=16):
    lq, lk = VARLEN_LENS
    cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    return (rng.standard_normal((cq[-1], h, d)).astype(dtype),
            rng.standard_normal((ck[-1], hkv, d)).astype(dtype),
            rng.standard_normal((ck[-1], hkv, d)).astype(dtype), cq, ck)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("offset", [-9, 0, 4, 30])
@pytest.mark.parametrize("opt", ["causal", "window", "causal_window_alibi", "top_left_window"])
def test_varlen_matches_reference_and_the_batched_rows(rng, opt, offset, dtype):
    q, k, v, cq, ck = _packed(rng, dtype)
    kw = OPTIONS[opt]
    got, got_lse = na.attention_varlen(q, k, v, cq, ck, q_offset=offset, return_lse=True,
                                       backend="cpu", **kw)
    expected, expected_lse = ref.attention_varlen(q, k, v, cq, ck, q_offset=offset,
                                                  return_lse=True, **kw)
    assert_close(got, expected, dtype)
    assert_close(got_lse, expected_lse, dtype, "lse")
    for b in range(len(cq) - 1):  # each row alone, batched, with the same offset
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        row, row_lse = ref.attention(q[None, qs], k[None, ks], v[None, ks], q_offset=offset,
                                     return_lse=True, **kw)
        assert_close(got[qs], row[0], dtype)
        assert_close(got_lse[:, qs], row_lse[0], dtype, "lse")


@pytest.mark.parametrize("offset", [-3, 6])
def test_varlen_backward_and_vjp_take_the_offset(rng, offset):
    q, k, v, cq, ck = _packed(rng, np.float64)
    kw = dict(causal=True, window=(5, -1), sinks=np.array([0.5, -1.0, 0.0, 2.0]))
    out, lse = na.attention_varlen(q, k, v, cq, ck, q_offset=offset, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    got = na.attention_varlen_backward(dout, q, k, v, out, lse, cq, ck, q_offset=offset,
                                       return_dsinks=True, **kw)
    expected = ref.attention_varlen_backward(dout, q, k, v, out, lse, cq, ck,
                                             q_offset=offset, **kw)
    for name, g, e in zip(["dq", "dk", "dv", "dsinks"], got, expected[:3] + expected[4:]):
        assert_close(g, e, np.float64, name)
    out2, vjp = na.attention_varlen_vjp(q, k, v, cq, ck, q_offset=offset,
                                        return_dsinks=True, **kw)
    assert_close(out2, out, np.float64)
    for name, g, e in zip(["dq", "dk", "dv", "dsinks"], vjp(dout), got):
        assert_close(g, e, np.float64, name)
    # the offset matters: without it the gradients differ
    other = na.attention_varlen_backward(dout, q, k, v, out, lse, cq, ck, **kw)
    assert not np.allclose(other[0], got[0])


@pytest.mark.parametrize("bad, err", [(True, TypeError), (1.5, TypeError), (2**41, ValueError)])
def test_varlen_bad_offset_is_rejected(rng, bad, err):
    q, k, v, cq, ck = _packed(rng, np.float32)
    out = np.zeros((q.shape[0], 4, 16), np.float32)
    with pytest.raises(err, match="q_offset"):
        na.attention_varlen(q, k, v, cq, ck, causal=True, q_offset=bad, out=out)
    assert not out.any()
