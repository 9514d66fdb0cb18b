"""Tiles in dynamic shared memory (one buffer carved by forward.dynamic_layout) against
numba_attn.reference, and the plans that choose them."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn
from numba_attn import reference
from numba_attn.cuda import forward as fk
from numba_attn.cuda import launch

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}


def _qkv(rng, b, sq, sk, h, hkv, d, dtype):
    return (rng.standard_normal((b, sq, h, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype))


@pytest.mark.parametrize("dtype, tune", [
    (np.float32, dict(num_warps=2)),  # several warps, key tail (5-key tiles), GQA rows
    (np.float32, dict(nsplit=3)),  # split keys, then the merge
    (np.float64, dict(block_k=40)),  # two keys per lane; float64 tiles (8-byte offsets)
], ids=["two-warps", "split-keys", "float64-wide-tile"])
def test_dynamic_tiles_match_the_reference(rng, tuned, dtype, tune):
    q, k, v = _qkv(rng, 2, 4, 45, 4, 2, 8, dtype)
    opts = dict(causal=True, softcap=2.0, bias=rng.standard_normal((1, 4, 4, 45)),
                sinks=rng.standard_normal(4), kv_lens=np.array([45, 17], np.int32))
    expected, expected_lse = reference.attention(q, k, v, return_lse=True, **opts)
    with tuned(dynamic=True, **tune):
        pl = launch.plan(np.dtype(dtype), 8, 8, 2, 4)
        got, lse = numba_attn.attention(q, k, v, return_lse=True, backend="cuda", **opts)
    assert pl.dynamic == launch.shared_bytes(np.dtype(dtype).itemsize, 8, 8, 2, pl.block_q,
                                             pl.block_k, pl.num_warps)
    np.testing.assert_allclose(got, expected, **TOL[dtype])
    np.testing.assert_allclose(lse, expected_lse, **TOL[dtype])


@pytest.mark.parametrize("item", [4, 8])
def test_dynamic_layout_is_aligned_and_sized(item):
    for d, dv, group, bq, bk, nw in [(8, 8, 2, 3, 5, 1), (576, 576, 16, 1, 8, 4),
                                     (128, 64, 4, 4, 33, 4)]:
        q0, k0, v0, p0, end = fk.dynamic_layout(item, d, dv, group, bq, bk, nw)
        assert q0 * item == bk * 8  # the int64 key rows come first, 8-byte aligned
        assert q0 < k0 < v0 < p0 < end
        assert end * item == launch.shared_bytes(item, d, dv, group, bq, bk, nw)


def test_plans_move_capped_tiles_to_dynamic_shared_memory():
    f32 = np.dtype(np.float32)
    for d in (64, 128):  # static tiles already hold >= 32 keys: unchanged
        assert launch.plan(f32, d, d, 1, 4096).dynamic == 0
    mla = launch.plan(f32, 576, 576, 16, 1)  # absorbed MLA decode: 16 heads, D = 576
    static = None
    with launch.tuning(dynamic=False):
        static = launch.plan(f32, 576, 576, 16, 1)
    assert static.dynamic == 0 and static.block_k == 1  # one key per tile and barrier
    assert mla.block_k > static.block_k
    assert launch.STATIC_LIMIT < mla.dynamic <= launch.DYNAMIC_BUDGET
    assert mla.dynamic == launch.shared_bytes(4, 576, 576, 16, mla.block_q, mla.block_k,
                                              mla.num_warps)


@pytest.mark.parametrize("tune", [dict(heads=2), dict(heads=1, nsplit=2),
                                  dict(heads=2, dynamic=True, num_warps=2)],
                         ids=["two-heads-per-block", "one-head-split-keys", "dynamic"])
def test_group_spread_over_blocks_matches_the_reference(rng, tuned, tune):
    q, k, v = _qkv(rng, 2, 3, 11, 8, 2, 8, np.float32)  # 4 query heads per kv head
    opts = dict(causal=True, sinks=rng.standard_normal(8), alibi_slopes=rng.random(8),
                bias=rng.standard_normal((2, 8, 1, 11)))
    expected, expected_lse = reference.attention(q, k, v, return_lse=True, **opts)
    with tuned(**tune):
        assert launch.plan(np.dtype(np.float32), 8, 8, 4, 3).heads == tune["heads"]
        got, lse = numba_attn.attention(q, k, v, return_lse=True, backend="cuda", **opts)
    np.testing.assert_allclose(got, expected, **TOL[np.float32])
    np.testing.assert_allclose(lse, expected_lse, **TOL[np.float32])


def test_a_group_too_large_for_one_block_is_spread():
    f32 = np.dtype(np.float32)
    pl = launch.plan(f32, 576, 576, 128, 1)  # DeepSeek-V3 absorbed decode: 128 heads
    assert pl is not None and 0 < pl.heads < 128 and 128 % pl.heads == 0
    assert launch.shared_bytes(4, 576, 576, pl.heads, pl.block_q, pl.block_k,
                               pl.num_warps) <= max(pl.dynamic, launch.SHARED_BYTES)
    assert launch.plan(f32, 128, 128, 8, 4096).heads == 0  # fits whole: unchanged
