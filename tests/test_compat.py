"""numba_attn.compat against the native API, FlashAttention's semantics written out with
the numpy oracle (reference.py), and torch's own scaled_dot_product_attention."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn as na
from numba_attn import AttentionError, compat, reference
from numba_attn import reference_rope as rr

from numerics import assert_close

F32 = np.float32


def randn(rng, *shape, dtype=F32):
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------------------
# flash_attn_func and friends
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("extra", ["plain", "window", "softcap-alibi"])
def test_flash_attn_func_matches_native_and_reference(rng, causal, extra):
    q, k, v = randn(rng, 2, 5, 4, 16), randn(rng, 2, 9, 2, 16), randn(rng, 2, 9, 2, 16)
    kw = {"plain": {}, "window": dict(window_size=(3, 1)),
          "softcap-alibi": dict(softcap=2.0, alibi_slopes=np.array([.5, .25, .1, .05], F32))
          }[extra]
    got, lse, probs = compat.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal,
                                             return_attn_probs=True, **kw)
    native = dict(window=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0),
                  alibi_slopes=kw.get("alibi_slopes"))
    exp, exp_lse = na.attention(q, k, v, scale=0.3, causal=causal, return_lse=True, **native)
    np.testing.assert_array_equal(got, exp)
    np.testing.assert_array_equal(lse, exp_lse)
    assert probs is None
    ref, ref_lse = reference.attention(q, k, v, scale=0.3, causal=causal, return_lse=True,
                                       **native)
    assert_close(got, ref, F32)
    assert_close(lse, ref_lse, F32, "lse")


def test_varlen_and_packed_forms(rng):
    q, k, v = randn(rng, 7, 4, 8), randn(rng, 9, 2, 8), randn(rng, 9, 2, 8)
    cu_q, cu_k = np.array([0, 3, 7], np.int32), np.array([0, 5, 9], np.int32)
    got, lse, _ = compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True,
                                                return_attn_probs=True)
    exp, exp_lse = na.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    np.testing.assert_array_equal(got, exp)
    np.testing.assert_array_equal(lse, exp_lse)
    qkv = randn(rng, 2, 6, 3, 4, 8)
    np.testing.assert_array_equal(
        compat.flash_attn_qkvpacked_func(qkv, causal=True),
        na.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True))
    qq, kv = randn(rng, 2, 3, 4, 8), randn(rng, 2, 6, 2, 2, 8)
    np.testing.assert_array_equal(compat.flash_attn_kvpacked_func(qq, kv, causal=True),
                                  na.attention(qq, kv[:, :, 0], kv[:, :, 1], causal=True))


def test_unsupported_options_raise():
    x = np.zeros((4, 2, 8), F32)
    cu = np.array([0, 4], np.int32)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        compat.flash_attn_varlen_func(x, x[None], x[None], cu, cu, 4, 4, dropout_p=0.1,
                                      block_table=np.zeros((1, 1), np.int32))
    kc = np.zeros((4, 4, 2, 8), F32)
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        compat.flash_attn_with_kvcache(np.zeros((1, 1, 2, 8), F32), kc, kc.copy(),
                                       cache_seqlens=1, block_table=np.zeros((1, 2), np.int32),
                                       cache_leftpad=np.zeros(1, np.int32))
    with pytest.raises(TypeError, match="causal"):
        compat.flash_attn_func(x[None], x[None], x[None], causal="yes")


# ---------------------------------------------------------------------------------------
# flash_attn_with_kvcache: FlashAttention's rules written out with the oracle
# ---------------------------------------------------------------------------------------
def fa_kvcache_oracle(q, k_cache, v_cache, k, v, cos, sin, lens, idx, pad, causal, window,
                      interleaved, scale, block_table=None):
    """FlashAttention's flash_attn_with_kvcache in float64 numpy, on copies of the caches.

    Rotary: new keys at lens + t; queries at lens + i when causal/local, else all at lens.
    Keys of row b: cache positions pad[b] .. lens[b] + n - 1, bottom-right aligned to them.
    """
    kc, vc = np.array(k_cache, np.float64), np.array(v_cache, np.float64)
    bsz, sq, h, d = q.shape
    n = 0 if k is None else k.shape[1]
    outs, lses = [], []
    for b in range(bsz):
        qb = np.array(q[b], np.float64)
        if cos is not None:
            per_token = causal or tuple(window) != (-1, -1)
            qpos = lens[b] + (np.arange(sq) if per_token else np.zeros(sq, int))
            qb = rr.apply_rotary(qb, cos, sin, qpos, interleaved)
        if n:
            kb = np.array(k[b], np.float64)
            if cos is not None:
                kb = rr.apply_rotary(kb, cos, sin, lens[b] + np.arange(n), interleaved)
            kb = kb.astype(k.dtype).astype(np.float64)  # stored in the cache's dtype
            for t in range(n):
                pos = lens[b] + t
                if block_table is None:
                    kc[idx[b], pos], vc[idx[b], pos] = kb[t], v[b, t]
                else:
                    page, slot = block_table[b, pos // kc.shape[1]], pos % kc.shape[1]
                    kc[page, slot], vc[page, slot] = kb[t], v[b, t]
        end = lens[b] + n
        if block_table is None:
            keys, vals = kc[idx[b], pad[b]:end], vc[idx[b], pad[b]:end]
        else:
            bs = kc.shape[1]
            pages = block_table[b, :-(-end // bs)]
            keys = kc[pages].reshape(-1, *kc.shape[2:])[:end]
            vals = vc[pages].reshape(-1, *vc.shape[2:])[:end]
        o, lse = reference.attention(qb[None], keys[None], vals[None], causal=causal,
                                     window=window, scale=scale, return_lse=True)
        outs.append(o[0])
        lses.append(lse[0])
    return np.stack(outs), np.stack(lses), kc, vc


KV_CASES = {
    "decode-causal-rotary": dict(sq=1, n=1, causal=True, rotary=True),
    "chunk-noncausal-rotary": dict(sq=3, n=3, causal=False, rotary=True),
    "chunk-neox-window": dict(sq=3, n=2, causal=True, rotary=True, interleaved=False,
                              window=(2, 0)),
    "batch-idx-leftpad": dict(sq=2, n=2, causal=True, rotary=True, batch_idx=True,
                              leftpad=True),
    "no-new-kv": dict(sq=2, n=0, causal=True, rotary=False),
    "paged": dict(sq=2, n=3, causal=True, rotary=True, paged=True),
}


@pytest.mark.parametrize("case", list(KV_CASES))
def test_flash_attn_with_kvcache_matches_flashattention_rules(rng, case):
    c = dict(interleaved=True, window=(-1, -1), batch_idx=False, leftpad=False, paged=False)
    c.update(KV_CASES[case])
    bsz, h, hkv, d, s_cache, nb = 2, 4, 2, 16, 12, 3
    sq, n = c["sq"], c["n"]
    q = randn(rng, bsz, sq, h, d)
    k = randn(rng, bsz, n, hkv, d) if n else None
    v = randn(rng, bsz, n, hkv, d) if n else None
    lens = np.array([4, 6], np.int32)
    idx = np.array([2, 0], np.int32) if c["batch_idx"] else np.arange(bsz)
    pad = np.array([1, 3], np.int32) if c["leftpad"] else np.zeros(bsz, np.int32)
    bt = None
    if c["paged"]:
        bs = 4
        k_cache, v_cache = randn(rng, 6, bs, hkv, d), randn(rng, 6, bs, hkv, d)
        bt = np.array([[5, 1, 3], [0, 2, 4]], np.int32)
    else:
        k_cache, v_cache = randn(rng, nb, s_cache, hkv, d), randn(rng, nb, s_cache, hkv, d)
    cos, sin = (na.rotary_cos_sin(32, 8, dtype=np.float64) if c["rotary"] else (None, None))
    exp, exp_lse, exp_kc, exp_vc = fa_kvcache_oracle(
        q, k_cache, v_cache, k, v, cos, sin, lens, idx, pad, c["causal"], c["window"],
        c["interleaved"], 0.25, bt)
    kw = {}
    if c["batch_idx"]:
        kw["cache_batch_idx"] = idx
    if c["leftpad"]:
        kw["cache_leftpad"] = pad
    lens_before = lens.copy()
    out, lse = compat.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
        block_table=bt, softmax_scale=0.25, causal=c["causal"], window_size=c["window"],
        rotary_interleaved=c["interleaved"], return_softmax_lse=True, **kw)
    assert_close(out, exp, F32)
    assert_close(lse, exp_lse, F32, "lse")
    np.testing.assert_allclose(k_cache, exp_kc, atol=1e-6)  # written in place
    np.testing.assert_array_equal(v_cache, exp_vc.astype(F32))
    np.testing.assert_array_equal(lens, lens_before)  # FlashAttention never advances it


def test_flash_attn_with_kvcache_equals_native_decode(rng):
    """Causal decoding: the same as KVCache + attention_with_kvcache (interleaved rotary)."""
    cache = na.KVCache(2, 16, num_kv_heads=2, head_dim=16)
    kc, vc = np.zeros_like(cache.k), np.zeros_like(cache.v)
    lens = np.zeros(2, np.int32)
    cos, sin = na.rotary_cos_sin(16, 16)
    for step in range(3):
        q, kv = randn(rng, 2, 2, 4, 16), randn(rng, 2, 2, 2, 16)
        got = compat.flash_attn_with_kvcache(q, kc, vc, kv, kv, cos, sin, cache_seqlens=lens,
                                             causal=True)
        exp = na.attention_with_kvcache(q, cache, kv, kv, rotary_cos=cos, rotary_sin=sin,
                                        rotary_interleaved=True, causal=True)
        lens += 2
        np.testing.assert_allclose(got, exp, atol=1e-6)
    np.testing.assert_allclose(kc, cache.k, atol=1e-6)


def test_cache_seqlens_as_a_scalar(rng):
    kc, vc = randn(rng, 2, 8, 2, 8), randn(rng, 2, 8, 2, 8)
    q = randn(rng, 2, 1, 2, 8)
    exp = compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.array([5, 5], np.int32))
    for scalar in (5, np.int32(5), np.array(5)):
        got = compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=scalar)
        np.testing.assert_array_equal(got, exp)
    with pytest.raises(TypeError, match="cache_seqlens"):
        compat.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=5.0)


def test_flash_attn_with_kvcache_failure_writes_nothing(rng):
    kc, vc = randn(rng, 2, 8, 2, 8), randn(rng, 2, 8, 2, 8)
    before = kc.copy(), vc.copy()
    q, kv = randn(rng, 2, 1, 2, 8), randn(rng, 2, 1, 2, 8)
    bad = [
        (dict(cache_seqlens=np.array([3, 8], np.int32)), AttentionError, "cache_seqlens"),
        (dict(cache_seqlens=np.array([3, 3], np.int32), window_size=(2**64, 0.5)),
         AttentionError, "window"),
        (dict(cache_seqlens=np.array([3, 3], np.int32), softmax_scale=1e39),
         AttentionError, "scale"),
        (dict(cache_seqlens=np.array([3, 3], np.int32), rotary_cos=np.ones((3, 4), F32),
              rotary_sin=np.ones((3, 4), F32)), AttentionError, "positions"),
        (dict(cache_seqlens=np.array([1, 1], np.int32),
              cache_batch_idx=np.array([1, 1], np.int32)), AttentionError, "cache_batch_idx"),
        (dict(cache_seqlens=np.array([1, 1], np.int32),
              cache_leftpad=np.array([2, 0], np.int32)), AttentionError, "cache_leftpad"),
        (dict(cache_seqlens=2, alibi_slopes="x"), TypeError, "alibi_slopes"),
    ]
    for kw, exc, text in bad:
        with pytest.raises(exc, match=text):
            compat.flash_attn_with_kvcache(q, kc, vc, kv, kv, **kw)
        np.testing.assert_array_equal(kc, before[0])
        np.testing.assert_array_equal(vc, before[1])


# ---------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------------------
def sdpa_oracle(q, k, v, mask=None, causal=False, scale=None, gqa=False):
    """torch's documented math: softmax(q k^T * scale + mask) v, (..., H, L, E) layout."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if gqa and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, rep, axis=-3), np.repeat(v, rep, axis=-3)
    s = q @ np.swapaxes(k, -1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    L, S = q.shape[-2], k.shape[-2]
    if causal:
        s = np.where(np.tril(np.ones((L, S), bool)), s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


SDPA_CASES = {
    "4d": dict(q=(2, 4, 5, 8), k=(2, 4, 7, 8)),
    "4d-causal-lq<lk": dict(q=(2, 4, 3, 8), k=(2, 4, 7, 8), causal=True),
    "4d-causal-lq>lk": dict(q=(1, 2, 6, 8), k=(1, 2, 4, 8), causal=True),
    "3d": dict(q=(3, 5, 8), k=(3, 6, 8)),
    "5d-bool-mask": dict(q=(2, 2, 2, 3, 8), k=(2, 2, 2, 5, 8), mask="bool"),
    "gqa-float-mask": dict(q=(2, 6, 4, 8), k=(2, 2, 5, 8), gqa=True, mask="float",
                           scale=0.5),
    "gqa-causal-dv": dict(q=(1, 4, 5, 8), k=(1, 1, 5, 8), gqa=True, causal=True, dv=4),
}


def _sdpa_inputs(rng, c):
    q = randn(rng, *c["q"], dtype=np.float64)
    k = randn(rng, *c["k"], dtype=np.float64)
    v = randn(rng, *(c["k"][:-1] + (c.get("dv", c["k"][-1]),)), dtype=np.float64)
    mshape = c["q"][:-1] + (c["k"][-2],)
    mask = None
    if c.get("mask") == "bool":
        mask = rng.random(mshape[-2:]) < 0.7
        mask[:, 0] = True  # no fully masked row (torch gives NaN there)
    elif c.get("mask") == "float":
        mask = rng.standard_normal((1,) + mshape[1:])
    return q, k, v, mask


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_torchs_math(rng, case):
    c = SDPA_CASES[case]
    q, k, v, mask = _sdpa_inputs(rng, c)
    got = compat.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=c.get("causal", False),
                                              scale=c.get("scale"), enable_gqa=c.get("gqa",
                                                                                    False))
    exp = sdpa_oracle(q, k, v, mask, c.get("causal", False), c.get("scale"),
                      c.get("gqa", False))
    assert_close(got, exp, np.float64)


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_torch_itself(rng, case):
    torch = pytest.importorskip("torch")
    c = SDPA_CASES[case]
    q, k, v, mask = _sdpa_inputs(rng, c)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    tmask = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))
    kw = dict(is_causal=c.get("causal", False), scale=c.get("scale"))
    if c.get("gqa"):
        kw["enable_gqa"] = True
    if kw["is_causal"] and tmask is not None:
        pytest.skip("torch refuses is_causal with attn_mask")
    exp = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, **kw)
    got = compat.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, **kw)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert_close(got.numpy(), exp.numpy(), np.float64)


def test_sdpa_head_mismatch_needs_enable_gqa():
    q, k = np.zeros((1, 4, 2, 8)), np.zeros((1, 2, 2, 8))
    with pytest.raises(AttentionError, match="enable_gqa"):
        compat.scaled_dot_product_attention(q, k, k)
    with pytest.raises(AttentionError, match="enable_gqa"):
        compat.scaled_dot_product_attention(q, np.zeros((1, 3, 2, 8)), np.zeros((1, 3, 2, 8)),
                                            enable_gqa=True)


def test_flash_attn_torch_in_torch_out(rng):
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 4, 4, 8, requires_grad=True)
    kv = torch.randn(1, 6, 2, 8)
    got = compat.flash_attn_func(q, kv, kv, causal=True)
    assert isinstance(got, torch.Tensor) and got.grad_fn is not None  # autograd flows
    exp = na.attention(q.detach().numpy(), kv.numpy(), kv.numpy(), causal=True)
    np.testing.assert_array_equal(got.detach().numpy(), exp)
    kc, vc = torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8)
    out = compat.flash_attn_with_kvcache(q, kc, vc, kv[:, :2], kv[:, :2],
                                         cache_seqlens=torch.tensor([0], dtype=torch.int32),
                                         causal=True)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(kc[0, :2].numpy(), kv[0, :2].numpy())  # in place
