"""bfloat16 device arrays and device caches (uint16 bits in the kernels), against
reference.py on the same bfloat16 values, and the bit conversions against ml_dtypes."""
from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import numba_attn
from numba_attn import KVCache, PagedKVCache, reference
from numba_attn import reference_rope as rr

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = dict(rtol=1e-2, atol=1e-2)  # the output is rounded to bfloat16 (2^-8 relative)


def bf(rng, shape):
    return rng.standard_normal(shape).astype(np.float32).astype(BF16)


def f64(x):
    return np.asarray(x).astype(np.float64)


def test_bit_conversions_match_ml_dtypes(rng):
    from numba_attn.cuda import bf16 as bfm

    @cuda.jit
    def roundtrip(src, wide, back):
        i = cuda.grid(1)
        if i < src.shape[0]:
            wide[i] = bfm.load(src[i])
            back[i] = bfm.store(wide[i] * np.float32(0.7))

    x = np.concatenate([rng.standard_normal(200) * 10.0 ** rng.integers(-40, 38, 200),
                        [0.0, -0.0, np.inf, -np.inf, np.nan, 3.3e38, 1e-45]])
    xb = x.astype(np.float32).astype(BF16)
    wide = cuda.device_array(len(x), np.float32)
    back = cuda.device_array(len(x), np.uint16)
    roundtrip[-(-len(x) // 64), 64](cuda.to_device(xb.view(np.uint16)), wide, back)
    np.testing.assert_array_equal(wide.copy_to_host(), xb.astype(np.float32))
    want = (xb.astype(np.float32) * np.float32(0.7)).astype(BF16)  # round to nearest even
    got = back.copy_to_host().view(BF16)
    assert np.array_equal(got.view(np.uint16)[~np.isnan(want)],
                          want.view(np.uint16)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)].astype(np.float32)).all()


@pytest.mark.parametrize("nsplit", [1, 3], ids=["one-pass", "split-keys"])
def test_bf16_device_attention(rng, tuned, nsplit):
    q, k, v = bf(rng, (2, 3, 4, 8)), bf(rng, (2, 11, 2, 8)), bf(rng, (2, 11, 2, 8))
    kv_lens = np.array([11, 6], np.int32)
    exp, exp_lse = reference.attention(f64(q), f64(k), f64(v), causal=True, kv_lens=kv_lens,
                                       softcap=3.0, return_lse=True)
    dk = cuda.to_device(np.repeat(k, 2, axis=2))[:, :, ::2]  # strided: copied bits
    with tuned(nsplit=nsplit):
        got, lse = numba_attn.attention(cuda.to_device(q), dk, cuda.to_device(v),
                                        causal=True, kv_lens=kv_lens, softcap=3.0,
                                        return_lse=True)
    assert got.dtype == BF16 and lse.dtype == np.float32 and got.shape == q.shape
    np.testing.assert_allclose(f64(got.copy_to_host()), exp, **TOL)
    np.testing.assert_allclose(lse.copy_to_host(), exp_lse, rtol=1e-5, atol=1e-5)


def test_bf16_device_out_argument(rng, tuned):
    q, k = bf(rng, (1, 3, 2, 8)), bf(rng, (1, 5, 1, 8))
    out = cuda.to_device(np.zeros((1, 3, 2, 8), BF16))
    with tuned():
        got = numba_attn.attention(cuda.to_device(q), cuda.to_device(k), cuda.to_device(k),
                                   out=out)
    assert got is out
    np.testing.assert_allclose(f64(out.copy_to_host()),
                               reference.attention(f64(q), f64(k), f64(k)), **TOL)


@pytest.mark.parametrize("kind", ["contiguous", "paged-bs3"])
def test_bf16_device_cache_decodes_with_rotary(rng, tuned, kind):
    batch, total, h, hkv, d = 2, 5, 4, 2, 8
    q, k, v = bf(rng, (batch, total, h, d)), bf(rng, (batch, total, hkv, d)), \
        bf(rng, (batch, total, hkv, d))
    cos, sin = numba_attn.rotary_cos_sin(8, d)
    c64, s64 = rr.rotary_cos_sin(8, d)
    pos = np.arange(total)
    rot = lambda x: rr.apply_rotary(f64(x), c64, s64, pos)  # noqa: E731
    expected = np.stack([reference.attention(rot(q[b])[None], rot(k[b])[None],
                                             f64(v[b])[None], causal=True)[0]
                         for b in range(batch)])
    cache = (KVCache(batch, 6, hkv, d, dtype=BF16, device="cuda") if kind == "contiguous"
             else PagedKVCache(batch, 6, 3, hkv, d, dtype=BF16, device="cuda"))
    dev = lambda x: cuda.to_device(np.ascontiguousarray(x))  # noqa: E731
    with tuned():
        for s0, s1 in [(0, 2), (2, 3), (3, 4), (4, 5)]:
            got = numba_attn.attention_with_kvcache(
                dev(q[:, s0:s1]), cache, dev(k[:, s0:s1]), dev(v[:, s0:s1]),
                rotary_cos=cos, rotary_sin=sin, causal=True)
            assert got.dtype == BF16
            np.testing.assert_allclose(f64(got.copy_to_host()), expected[:, s0:s1],
                                       rtol=2e-2, atol=2e-2)
    keys, values = (a.copy_to_host() if hasattr(a, "copy_to_host") else a
                    for a in cache.prefix(1))
    assert keys.dtype == BF16
    np.testing.assert_array_equal(values.view(np.uint16), v[1].view(np.uint16))  # bits kept
    np.testing.assert_allclose(f64(keys), rot(k[1]), rtol=1e-2, atol=1e-2)


def test_bf16_device_rms_norm(rng):
    x = bf(rng, (3, 40))
    w = rng.standard_normal(40).astype(np.float32)
    got = numba_attn.rms_norm(cuda.to_device(x), cuda.to_device(w), eps=1e-6)
    assert got.dtype == BF16
    xf = f64(x)
    want = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(f64(got.copy_to_host()), want, rtol=8e-3, atol=1e-2)


def test_device_rms_norm_refuses_out(rng):
    """A device x's result is a new device array: out= is refused naming it (it used to be
    ignored), before anything runs."""
    x = rng.standard_normal((3, 8)).astype(np.float32)
    w = np.ones(8, np.float32)
    with pytest.raises(TypeError, match="out: rms_norm of a device array"):
        numba_attn.rms_norm(cuda.to_device(x), cuda.to_device(w), eps=1e-6,
                            out=np.empty_like(x))


@pytest.mark.parametrize("kind", ["contiguous", "paged-bs3"])
def test_bf16_device_cache_decodes_like_the_cpu_cache(rng, tuned, kind):
    """The same prefill + decode steps over a bfloat16 cache on the device and on the host
    (CPU kernels): the same outputs (both rounded to bfloat16 from float32 sums) and the
    same stored bits."""
    batch, total, h, hkv, d = 2, 6, 4, 2, 8
    q, k, v = bf(rng, (batch, total, h, d)), bf(rng, (batch, total, hkv, d)), \
        bf(rng, (batch, total, hkv, d))
    sinks = rng.standard_normal(h).astype(np.float32)

    def make(device):
        if kind == "contiguous":
            return KVCache(batch, 7, hkv, d, dtype=BF16, device=device)
        return PagedKVCache(batch, 7, 3, hkv, d, dtype=BF16, device=device)

    gpu, cpu = make("cuda"), make("cpu")
    dev = lambda x: cuda.to_device(np.ascontiguousarray(x))  # noqa: E731
    with tuned():
        for s0, s1 in [(0, 3), (3, 4), (4, 5), (5, 6)]:
            sl = slice(s0, s1)
            got = numba_attn.attention_with_kvcache(dev(q[:, sl]), gpu, dev(k[:, sl]),
                                                    dev(v[:, sl]), causal=True, sinks=sinks)
            want = numba_attn.attention_with_kvcache(q[:, sl], cpu, k[:, sl], v[:, sl],
                                                     causal=True, sinks=sinks)
            assert got.dtype == want.dtype == BF16
            np.testing.assert_allclose(f64(got.copy_to_host()), f64(want), rtol=8e-3,
                                       atol=1e-3)  # one bfloat16 rounding step apart
    for b in range(batch):
        (gk, gv), (ck, cv) = gpu.prefix(b), cpu.prefix(b)
        gk, gv = (a.copy_to_host() if hasattr(a, "copy_to_host") else a for a in (gk, gv))
        np.testing.assert_array_equal(gk.view(np.uint16), np.asarray(ck).view(np.uint16))
        np.testing.assert_array_equal(gv.view(np.uint16), np.asarray(cv).view(np.uint16))
