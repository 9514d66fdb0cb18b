"""score_mod / mask_mod / block_mask as CUDA device functions, against numba_attn.reference
and the CPU kernels (small odd tiles force several query and key tiles)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import numba_attn
from numba_attn import reference

TOL = dict(rtol=2e-5, atol=2e-5)


def rel_bias(score, b, h, i, j, table):
    return score + table[h, min(max(j - i, -4), 4) + 4]


def tanh_cap(score, b, h, i, j, caps):
    return caps[h] * math.tanh(score / caps[h])


def document(b, h, i, j, doc):
    return doc[b, i] == doc[b, j] and j <= i


def _qkv(rng, b, sq, sk, h, hkv, d=8):
    return (rng.standard_normal((b, sq, h, d)).astype(np.float32),
            rng.standard_normal((b, sk, hkv, d)).astype(np.float32),
            rng.standard_normal((b, sk, hkv, d)).astype(np.float32))


def test_score_and_mask_mods_match_reference_and_cpu(rng, tuned):
    q, k, v = _qkv(rng, 2, 7, 9, 4, 2)
    table = rng.standard_normal((4, 9))
    doc = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 2]])
    kw = dict(score_mod=rel_bias, score_mod_args=(table,), mask_mod=document,
              mask_mod_args=(doc,), return_lse=True)
    ro, rl = reference.attention(q, k, v, **kw)
    with tuned():
        o, lse = numba_attn.attention(q, k, v, backend="cuda", **kw)
    np.testing.assert_allclose(o, ro, **TOL)
    np.testing.assert_allclose(lse, rl, **TOL)
    co, cl = numba_attn.attention(q, k, v, backend="cpu", **kw)
    np.testing.assert_allclose(o, co, **TOL)
    np.testing.assert_allclose(lse, cl, **TOL)


def test_block_mask_skips_tiles_with_identical_results(rng, tuned):
    q, k, v = _qkv(rng, 1, 12, 12, 2, 1)
    doc = np.repeat(np.arange(3), 4)[None]
    bm = numba_attn.create_block_mask(document, 1, 1, 12, 12, mask_mod_args=(doc,),
                                      block_size=(2, 2))
    assert (bm.flags == 0).any() and (bm.flags == 2).any()
    caps = np.array([1.5, 4.0])
    with tuned():
        o = numba_attn.attention(q, k, v, block_mask=bm, score_mod=tanh_cap,
                                 score_mod_args=(caps,), backend="cuda")
        o2 = numba_attn.attention(q, k, v, mask_mod=document, mask_mod_args=(doc,),
                                  score_mod=tanh_cap, score_mod_args=(caps,), backend="cuda")
    np.testing.assert_array_equal(o, o2)
    ro = reference.attention(q, k, v, mask_mod=document, mask_mod_args=(doc,),
                             score_mod=tanh_cap, score_mod_args=(caps,))
    np.testing.assert_allclose(o, ro, **TOL)


def head_band(b, h, i, j, width):
    return abs(i - j) <= width[h]


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_mods_with_dynamic_tiles_head_chunks_and_bf16_storage(rng, tuned, storage):
    """One kernel specialisation with mods, a per-head block mask, dynamic shared tiles and
    a GQA group spread over blocks (one query head per block), on device arrays; bfloat16
    storage too. The block-mask lookup must use each block's own query heads."""
    from numba import cuda

    q, k, v = _qkv(rng, 2, 10, 10, 4, 2)
    if storage == "bfloat16":
        bf = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
        q, k, v = (x.astype(bf) for x in (q, k, v))
    width = np.array([0, 6, 1, 9])  # per head: its blocks differ (empty / full / partial)
    table = rng.standard_normal((4, 9))
    bm = numba_attn.create_block_mask(head_band, 2, 4, 10, 10, mask_mod_args=(width,),
                                      block_size=(2, 2))
    assert bm.flags.shape[1] == 4 and (bm.flags == 0).any() and (bm.flags == 2).any()
    kw = dict(score_mod=rel_bias, score_mod_args=(table,), mask_mod=head_band,
              mask_mod_args=(width,))
    f64 = lambda x: np.asarray(x).astype(np.float64)  # noqa: E731
    expected = reference.attention(f64(q), f64(k), f64(v), **kw)
    with tuned(dynamic=True, heads=1):
        got = numba_attn.attention(*(cuda.to_device(x) for x in (q, k, v)), block_mask=bm,
                                   **kw).copy_to_host()
    assert got.dtype == q.dtype
    tol = TOL if storage == "float32" else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(f64(got), expected, **tol)
    cpu = numba_attn.attention(q, k, v, block_mask=bm, backend="cpu", **kw)
    np.testing.assert_allclose(f64(got), f64(cpu), **tol)
