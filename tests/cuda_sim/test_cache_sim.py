"""KV caches on the device (CUDA backend; the simulator in CI): generation loops, paged
reads, fork/copy-on-write, rotary and failures that leave the cache unchanged.

Tiny shapes: the simulator runs every thread in Python.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import numba_attn
from numba_attn import AttentionError, KVCache, PagedKVCache, reference
from numba_attn import reference_rope as rr

H, HKV, D = 4, 2, 8
TOL = dict(rtol=2e-5, atol=2e-5)

KINDS = {
    "contiguous": lambda b, cap: KVCache(b, cap, HKV, D, device="cuda"),
    "paged-bs3": lambda b, cap: PagedKVCache(b, b * -(-cap // 3) + 1, 3, HKV, D,
                                             device="cuda", max_seqlen=cap),
}


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host_state(cache):
    if isinstance(cache, PagedKVCache):
        return (cache.seqlens.copy(), cache.block_table.copy(), cache.refcount.copy(),
                cache.k_pages.copy_to_host(), cache.v_pages.copy_to_host())
    return cache.seqlens.copy(), cache.k.copy_to_host(), cache.v.copy_to_host()


@pytest.mark.parametrize("rotary", [False, True], ids=["no-rotary", "neox-partial"])
@pytest.mark.parametrize("kind", KINDS)
def test_generation_loop_equals_one_full_attention(rng, tuned, kind, rotary):
    batch, total, prefill = 2, 7, 3
    q = rng.standard_normal((batch, total, H, D)).astype(np.float32)
    k = rng.standard_normal((batch, total, HKV, D)).astype(np.float32)
    v = rng.standard_normal((batch, total, HKV, D)).astype(np.float32)
    kw = dict(causal=True, window=(4, 0))
    pos = np.arange(total)
    if rotary:
        cos, sin = numba_attn.rotary_cos_sin(16, 6)
        kw.update(rotary_cos=cos, rotary_sin=sin)
        c64, s64 = rr.rotary_cos_sin(16, 6)
        rot = lambda x: rr.apply_rotary(x, c64, s64, pos)  # noqa: E731
    else:
        rot = lambda x: x.astype(np.float64)  # noqa: E731
    expected = np.stack([reference.attention(rot(q[b])[None], rot(k[b])[None], v[b][None],
                                             causal=True, window=(4, 0))[0]
                         for b in range(batch)])
    cache = KINDS[kind](batch, total)
    with tuned():
        steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, total)]
        for s0, s1 in steps:
            got = numba_attn.attention_with_kvcache(
                dev(q[:, s0:s1]), cache, dev(k[:, s0:s1]), dev(v[:, s0:s1]), **kw)
            np.testing.assert_allclose(got.copy_to_host(), expected[:, s0:s1], **TOL)
    assert cache.seqlens.tolist() == [total, total]


def test_ragged_rows_split_decode_and_options_match_the_reference(rng, tuned):
    cache = PagedKVCache(3, 12, 2, HKV, D, device="cuda")
    kv = rng.standard_normal((3, 7, HKV, D)).astype(np.float32)
    cache.append(dev(kv), dev(kv))
    cache.seqlens = [7, 0, 4]
    q = dev(rng.standard_normal((3, 1, H, D)).astype(np.float32))
    opts = dict(softcap=2.0, sinks=rng.standard_normal(H), alibi_slopes=rng.random(H))
    with tuned(nsplit=3):
        got, lse = numba_attn.attention_with_kvcache(q, cache, return_lse=True, **opts)
    exp, exp_lse = numba_attn.attention_with_kvcache(q, cache, return_lse=True,
                                                     backend="reference", **opts)
    np.testing.assert_allclose(got.copy_to_host(), exp.copy_to_host()
                               if hasattr(exp, "copy_to_host") else exp, **TOL)
    got_lse = lse.copy_to_host() if hasattr(lse, "copy_to_host") else lse
    exp_lse = exp_lse.copy_to_host() if hasattr(exp_lse, "copy_to_host") else exp_lse
    np.testing.assert_allclose(got_lse, exp_lse, **TOL)


def test_fork_shares_pages_and_copies_on_write(rng, tuned):
    cache = PagedKVCache(2, 6, 2, HKV, D, device="cuda")
    k = rng.standard_normal((2, 3, HKV, D)).astype(np.float32)
    cache.append(dev(k), dev(k))
    cache.fork(0, 1)
    assert cache.block_table[1, 0] == cache.block_table[0, 0]
    kn = rng.standard_normal((2, 1, HKV, D)).astype(np.float32)
    q = rng.standard_normal((2, 1, H, D)).astype(np.float32)
    with tuned():
        got = numba_attn.attention_with_kvcache(dev(q), cache, dev(kn), dev(kn),
                                                causal=True).copy_to_host()
    assert cache.block_table[1, 0] == cache.block_table[0, 0]  # full page still shared
    assert cache.block_table[1, 1] != cache.block_table[0, 1]  # partial page copied
    for b in range(2):
        keys = np.concatenate([k[0], kn[b]])
        np.testing.assert_array_equal(cache.prefix(b)[0], keys)
        exp = reference.attention(q[b:b + 1], keys[None], keys[None], causal=True)
        np.testing.assert_allclose(got[b:b + 1], exp, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_overflow_leaves_the_device_cache_unchanged(rng, kind):
    cache = KINDS[kind](2, 4)
    kv = rng.standard_normal((2, 3, HKV, D)).astype(np.float32)
    cache.append(dev(kv), dev(kv))
    before = host_state(cache)
    kn = dev(rng.standard_normal((2, 2, HKV, D)).astype(np.float32))
    q = dev(rng.standard_normal((2, 2, H, D)).astype(np.float32))
    with pytest.raises(AttentionError, match="overflow"):
        numba_attn.attention_with_kvcache(q, cache, kn, kn)
    with pytest.raises(AttentionError, match="cpu"):
        numba_attn.attention_with_kvcache(np.zeros((2, 1, H, D), np.float32), cache)
    for a, b in zip(host_state(cache), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_apply_rotary_on_the_device(rng, interleaved):
    x = rng.standard_normal((2, 3, 2, 10)).astype(np.float32)
    cos, sin = numba_attn.rotary_cos_sin(12, 6)
    got = numba_attn.apply_rotary(dev(x), cos, sin, interleaved=interleaved, positions=4)
    pos = np.tile(4 + np.arange(3), 2)
    exp = rr.apply_rotary(x.reshape(6, 2, 10), *rr.rotary_cos_sin(12, 6), pos, interleaved)
    np.testing.assert_allclose(got.copy_to_host().reshape(6, 2, 10), exp, rtol=1e-6,
                               atol=1e-6)


def test_float16_device_cache_decodes_with_rotary(rng, tuned):
    batch, total = 2, 5
    q = rng.standard_normal((batch, total, H, D)).astype(np.float16)
    k = rng.standard_normal((batch, total, HKV, D)).astype(np.float16)
    cos, sin = numba_attn.rotary_cos_sin(8, D)
    c64, s64 = rr.rotary_cos_sin(8, D)
    pos = np.arange(total)
    expected = np.stack([reference.attention(
        rr.apply_rotary(q[b], c64, s64, pos)[None], rr.apply_rotary(k[b], c64, s64, pos)[None],
        k[b][None].astype(np.float64), causal=True)[0] for b in range(batch)])
    cache = PagedKVCache(batch, 6, 2, HKV, D, dtype=np.float16, device="cuda")
    with tuned():
        for t in range(total):
            got = numba_attn.attention_with_kvcache(
                dev(q[:, t:t + 1]), cache, dev(k[:, t:t + 1]), dev(k[:, t:t + 1]),
                rotary_cos=cos, rotary_sin=sin, causal=True)
            assert got.dtype == np.float16
            np.testing.assert_allclose(got.copy_to_host().astype(np.float64),
                                       expected[:, t:t + 1], rtol=5e-3, atol=5e-3)
