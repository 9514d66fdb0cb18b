"""8-bit KV caches on the CUDA backend: the fp8 / int8 bit conversions against ml_dtypes
and numpy, device append against numba_attn.quant on the host (bit for bit), decode and
prefill over device caches and over host caches with backend="cuda" against reference.py
on the dequantized cache (exact) and on the float data (the storage's bound), paging,
fork, the layer, MLA's latent cache, and the reasons the backend gives.

Tiny shapes: the simulator runs every thread in Python.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import numba_attn
from numba_attn import KVCache, PagedKVCache, quant, reference
from numba_attn import reference_rope as rr
from numba_attn.config import AttentionError, BackendUnavailable

ml_dtypes = pytest.importorskip("ml_dtypes")
E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)
DTYPES = {"int8": np.dtype(np.int8), "float8_e4m3fn": E4M3, "float8_e5m2": E5M2}
BOUND = {"int8": 3e-2, "float8_e4m3fn": 8e-2, "float8_e5m2": 0.2}  # of max |ref|
H, HKV, D = 4, 2, 8


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


def _kv(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def make(kind, dtype, batch, cap, device):
    if kind == "contiguous":
        return KVCache(batch, cap, HKV, D, dtype=dtype, device=device)
    return PagedKVCache(batch, batch * -(-cap // 3) + 2, 3, HKV, D, dtype=dtype,
                        device=device, max_seqlen=cap)


def exact_rows(q, cache, **kw):
    """reference.py (float64) over each row's dequantized keys/values."""
    outs = []
    for r in range(q.shape[0]):
        kq, vq = cache.dequantized_prefix(r)
        outs.append(reference.attention(q[r:r + 1].astype(np.float64), kq[None], vq[None],
                                        **kw)[0])
    return np.stack(outs)


# -- the bit conversions ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_decode_every_code_and_encode_like_ml_dtypes(rng, name):
    from numba_attn.cuda import quant as cq

    code = cq.code_of(DTYPES[name])
    dec, enc = cq.dequantizer(code), cq.encoder(code)

    @cuda.jit
    def roundtrip(bits, wide, src, back):
        i = cuda.grid(1)
        if i < bits.shape[0]:
            wide[i] = dec(bits[i])
        if i < src.shape[0]:
            back[i] = enc(src[i])

    fdt = DTYPES[name]
    codes = np.arange(256, dtype=np.uint8)
    finite = np.isfinite(codes.view(fdt).astype(np.float32))
    codes = codes[finite]  # NaN (and e5m2's inf) codes are never stored
    qmax = quant.QMAX[fdt]
    tiny = 2.0 ** (-9 if fdt == E4M3 else -16)  # the smallest subnormal
    grid = codes.view(fdt).astype(np.float32)
    pos = np.sort(grid[grid > 0])
    ties = (pos[:-1] + pos[1:]) / 2  # exact midpoints: round half to even
    src = np.concatenate([
        rng.uniform(-qmax, qmax, 64), rng.standard_normal(64) * 10.0 ** rng.integers(-6, 3, 64),
        rng.uniform(-8, 8, 32) * tiny, ties, -ties[::7], [0.0, -0.0, qmax, -qmax, tiny / 2,
                                                           3 * tiny / 2]]).astype(np.float32)
    src = np.clip(src, -qmax, qmax)
    wide = cuda.device_array(len(codes), np.float32)
    back = cuda.device_array(len(src), np.uint8)
    n = max(len(codes), len(src))
    roundtrip[-(-n // 64), 64](dev(codes), wide, dev(src), back)
    np.testing.assert_array_equal(wide.copy_to_host(), codes.view(fdt).astype(np.float32))
    np.testing.assert_array_equal(back.copy_to_host(), src.astype(fdt).view(np.uint8))


def test_int8_rounds_half_to_even(rng):
    from numba_attn.cuda import quant as cq

    enc = cq.encoder(cq.INT8)

    @cuda.jit
    def kern(src, out):
        i = cuda.grid(1)
        if i < src.shape[0]:
            out[i] = enc(src[i])

    src = np.concatenate([np.arange(-127, 127) + 0.5, rng.uniform(-127, 127, 100),
                          [127.0, -127.0, 0.0, -0.0, 126.49999]]).astype(np.float32)
    out = cuda.device_array(len(src), np.int8)
    kern[-(-len(src) // 64), 64](dev(src), out)
    np.testing.assert_array_equal(out.copy_to_host(), np.rint(src).astype(np.int8))


# -- device caches ----------------------------------------------------------------------
@pytest.mark.parametrize("new_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(DTYPES))
def test_device_append_stores_what_the_host_cache_stores(rng, tuned, name, new_dtype):
    ndt = np.dtype(ml_dtypes.bfloat16) if new_dtype == "bfloat16" else np.dtype(new_dtype)
    k, v = _kv(rng, 2, 5, HKV, D), _kv(rng, 2, 5, HKV, D) * 30.0
    k[1, 2, 0] = 0.0  # an all-zero row: scale 0, zeros
    k, v = k.astype(ndt), v.astype(ndt)
    gpu, cpu = (make("paged", DTYPES[name], 2, 7, d) for d in ("cuda", "cpu"))
    with tuned():
        gpu.append(dev(k), dev(v))
    cpu.append(k.astype(np.float32), v.astype(np.float32))
    assert hasattr(gpu.k_scale, "copy_to_host")  # the scales live on the device
    for r in range(2):
        for got, want in zip(gpu.prefix(r), cpu.prefix(r)):
            np.testing.assert_array_equal(host(got).view(np.uint8), want.view(np.uint8))
        for got, want in zip(gpu.prefix_scales(r), cpu.prefix_scales(r)):
            np.testing.assert_array_equal(host(got), want)
    assert cpu.prefix_scales(1)[0][2, 0] == 0.0


@pytest.mark.parametrize("nsplit", [1, 2], ids=["one-pass", "split-keys"])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("name", list(DTYPES))
def test_device_cache_prefill_and_decode_match_the_reference(rng, tuned, name, kind, nsplit):
    batch, total = 2, 9
    q = _kv(rng, batch, total, H, D)
    k, v = _kv(rng, batch, total, HKV, D), _kv(rng, batch, total, HKV, D)
    cache = make(kind, DTYPES[name], batch, total, "cuda")
    sinks = rng.standard_normal(H).astype(np.float32)
    kw = dict(causal=True, softcap=4.0, sinks=sinks)
    with tuned(nsplit=nsplit):
        for s0, s1 in [(0, 6), (6, 7), (7, 8), (8, 9)]:  # prefill of 6, then decode steps
            sl = slice(s0, s1)
            got = numba_attn.attention_with_kvcache(dev(q[:, sl]), cache, dev(k[:, sl]),
                                                    dev(v[:, sl]), **kw)
            assert got.dtype == np.float32 and hasattr(got, "copy_to_host")
            exact = exact_rows(q[:, sl], cache, **kw)
            np.testing.assert_allclose(got.copy_to_host(), exact, rtol=2e-5, atol=2e-6)
    assert cache.seqlens.tolist() == [total, total]
    floatref = reference.attention(q[:, 6:], k, v, **kw)
    err = np.abs(got.copy_to_host() - floatref[:, -1:]).max()
    assert 0 < err <= BOUND[name] * np.abs(floatref).max()


@pytest.mark.parametrize("name", ["int8", "float8_e4m3fn"])
def test_device_cache_rotary_and_float16_q(rng, tuned, name):
    batch, total, rot_dim = 2, 5, 6
    q = _kv(rng, batch, total, H, D).astype(np.float16)
    k, v = _kv(rng, batch, total, HKV, D), _kv(rng, batch, total, HKV, D)
    cos, sin = numba_attn.rotary_cos_sin(8, rot_dim)
    c64, s64 = rr.rotary_cos_sin(8, rot_dim)
    cache = make("paged", DTYPES[name], batch, total, "cuda")
    with tuned():
        for s0, s1 in [(0, 3), (3, 4), (4, 5)]:
            sl = slice(s0, s1)
            got = numba_attn.attention_with_kvcache(
                dev(q[:, sl]), cache, dev(k[:, sl]), dev(v[:, sl]), rotary_cos=cos,
                rotary_sin=sin, causal=True)
            assert got.dtype == np.float16
            qr = np.stack([rr.apply_rotary(q[b, sl].astype(np.float64), c64, s64,
                                           np.arange(s0, s1)) for b in range(batch)])
            exact = exact_rows(qr, cache, causal=True)
            np.testing.assert_allclose(got.copy_to_host().astype(np.float64), exact,
                                       rtol=2e-3, atol=2e-3)  # a float16 output
    # the stored keys are the rotated keys, quantized
    rk = rr.apply_rotary(k[1].astype(np.float64), c64, s64, np.arange(total))
    kq, ks = quant.quantize(rk.astype(np.float32), DTYPES[name])
    got_k = cache.dequantized_prefix(1)[0]
    np.testing.assert_allclose(got_k, quant.dequantize(kq, ks), rtol=0,
                               atol=2 * float(ks.max()) * (1 if name == "int8" else 32))


def test_fork_on_the_device_copies_scales_with_the_page(rng, tuned):
    cache = PagedKVCache(2, 8, 4, HKV, D, dtype=np.int8, device="cuda")
    k, v = _kv(rng, 2, 6, HKV, D), _kv(rng, 2, 6, HKV, D)
    q = _kv(rng, 2, 1, H, D)
    with tuned():
        cache.append(dev(k), dev(v))
        cache.fork(0, 1)
        before = cache.dequantized_prefix(0)
        kn, vn = _kv(rng, 2, 1, HKV, D), _kv(rng, 2, 1, HKV, D)
        kn[1] *= 7.0  # row 1 writes something else into its copy of the partial page
        got = numba_attn.attention_with_kvcache(dev(q), cache, dev(kn), dev(vn))
    assert cache.block_table[0, 1] != cache.block_table[1, 1]  # copied on write
    assert cache.block_table[0, 0] == cache.block_table[1, 0]  # the full page is shared
    for r in range(2):
        kr, vr = cache.dequantized_prefix(r)
        np.testing.assert_array_equal(kr[:6], before[0])
        np.testing.assert_array_equal(vr[:6], before[1])
        np.testing.assert_array_equal(kr[6:], quant.dequantize(*quant.quantize(kn[r])))
    np.testing.assert_allclose(got.copy_to_host(), exact_rows(q, cache), rtol=2e-5,
                               atol=2e-6)
    oracle = numba_attn.attention_with_kvcache(dev(q), cache, backend="reference")
    np.testing.assert_allclose(host(oracle), exact_rows(q, cache), rtol=2e-6, atol=1e-7)


# -- host caches on the cuda backend ----------------------------------------------------
@pytest.mark.parametrize("name", list(DTYPES))
def test_host_quantized_cache_on_the_cuda_backend(rng, tuned, name):
    cache = make("paged", DTYPES[name], 2, 12, "cpu")
    cache.append(_kv(rng, 2, 10, HKV, D), _kv(rng, 2, 10, HKV, D))
    cache.seqlens = np.array([10, 4])
    q = _kv(rng, 2, 2, H, D)
    kn, vn = _kv(rng, 2, 2, HKV, D), _kv(rng, 2, 2, HKV, D)
    with tuned(nsplit=2):
        got = numba_attn.attention_with_kvcache(q, cache, kn, vn, causal=True,
                                                backend="cuda")
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    exact = exact_rows(q, cache, causal=True)
    np.testing.assert_allclose(got, exact, rtol=2e-5, atol=2e-6)
    cpu = numba_attn.attention_with_kvcache(q, cache, causal=True, backend="cpu")
    with tuned():
        again = numba_attn.attention_with_kvcache(q, cache, causal=True, backend="cuda")
    np.testing.assert_allclose(again, cpu, rtol=2e-5, atol=2e-6)


def test_mla_int8_latent_cache_on_the_cuda_backend(rng, tuned):
    from numba_attn import MultiHeadLatentAttention

    m = MultiHeadLatentAttention(32, 2, kv_lora_rank=8, qk_nope_head_dim=4,
                                 qk_rope_head_dim=2, v_head_dim=4, seed=3)
    x = _kv(rng, 1, 4, 32)
    gpu, cpu = m.new_cache(1, 6, dtype=np.int8), m.new_cache(1, 6, dtype=np.int8)
    with tuned():
        for s0, s1 in [(0, 3), (3, 4)]:
            got = m(x[:, s0:s1], cache=gpu, backend="cuda")
            want = m(x[:, s0:s1], cache=cpu, backend="cpu")
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(gpu.kv, cpu.kv)
    np.testing.assert_array_equal(gpu.scale, cpu.scale)


@pytest.mark.parametrize("name", ["int8", "float8_e5m2"])
def test_mla_8bit_latent_cache_on_the_device(rng, tuned, name):
    from numba_attn import MultiHeadLatentAttention

    m = MultiHeadLatentAttention(32, 2, kv_lora_rank=8, qk_nope_head_dim=4,
                                 qk_rope_head_dim=2, v_head_dim=4, seed=5)
    x = _kv(rng, 2, 4, 32)
    gpu = m.new_cache(2, 6, device="cuda", dtype=DTYPES[name])
    cpu = m.new_cache(2, 6, dtype=DTYPES[name])
    assert hasattr(gpu.kv, "copy_to_host") and hasattr(gpu.scale, "copy_to_host")
    with tuned():
        for s0, s1 in [(0, 3), (3, 4)]:
            got = m(x[:, s0:s1], cache=gpu)
            want = m(x[:, s0:s1], cache=cpu, backend="cpu")
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    n = 4  # quantized on the device: the host cache's bits and scales
    np.testing.assert_array_equal(gpu.kv.copy_to_host()[:, :n].view(np.uint8),
                                  cpu.kv[:, :n].view(np.uint8))
    np.testing.assert_array_equal(gpu.scale.copy_to_host()[:, :n], cpu.scale[:, :n])
    np.testing.assert_array_equal(gpu.dequantized_prefix(1), cpu.dequantized_prefix(1))


# -- the layer --------------------------------------------------------------------------
def test_layer_over_a_device_int8_cache(rng, tuned):
    theta = 1e4
    layer = numba_attn.MultiHeadAttention(32, H, HKV, head_dim=D, rope_theta=theta, seed=2)
    x = _kv(rng, 1, 5, 32)
    cache = KVCache(1, 6, HKV, D, dtype=np.int8, device="cuda")
    with tuned():
        for s0, s1 in [(0, 3), (3, 4), (4, 5)]:
            y = layer(x[:, s0:s1], cache=cache)
            # expected: q projected and rotated in float64, reference.py over the cache's
            # dequantized rows, o_proj
            qf = (x[0, s0:s1].astype(np.float64) @ np.asarray(layer.w_q, np.float64).T)
            c64, s64 = rr.rotary_cos_sin(8, D, base=theta)
            qf = rr.apply_rotary(qf.reshape(s1 - s0, H, D), c64, s64, np.arange(s0, s1))
            o = exact_rows(qf[None], cache, causal=True).reshape(1, s1 - s0, H * D)
            want = o @ np.asarray(layer.w_o, np.float64).T
            np.testing.assert_allclose(y, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
    assert cache.k.dtype == np.int8 and cache.seqlens.tolist() == [5]


# -- what the backend refuses -----------------------------------------------------------
def test_reasons_and_errors_name_the_dtype(rng, monkeypatch):
    import dataclasses

    from numba_attn import backends, dispatch

    k8 = quant.quantize(_kv(rng, 1, 4, HKV, D))[0]
    with pytest.raises(TypeError, match="k: dtype int8 differs"):  # not a cache: refused
        numba_attn.attention(_kv(rng, 1, 2, H, D), k8, k8, backend="cuda")
    seen, select = [], dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda p, *a, **kw: seen.append(p) or
                        select(p, *a, **kw))
    host_cache = make("contiguous", E4M3, 1, 4, "cpu")
    host_cache.append(_kv(rng, 1, 3, HKV, D), _kv(rng, 1, 3, HKV, D))
    numba_attn.attention_with_kvcache(_kv(rng, 1, 1, H, D), host_cache, backend="cuda")
    be = backends.get_backend("cuda")
    assert be.not_supported_reasons(seen[-1]) == []
    bare = dataclasses.replace(seen[-1], extra={})  # 8-bit storage without its scales
    assert any("k: dtype float8_e4m3fn is read by the cuda kernels only as the storage of "
               "an 8-bit KV cache" in r for r in be.not_supported_reasons(bare))
    assert any("no backward over an 8-bit float8_e4m3fn KV cache" in r
               for r in be.not_supported_reasons(seen[-1], op="backward"))
    with pytest.raises(BackendUnavailable, match="k: dtype float8_e4m3fn"):
        dispatch.select(bare, "cuda")
    cache = make("paged", np.int8, 1, 6, "cuda")
    cache.append(dev(_kv(rng, 1, 2, HKV, D)), dev(_kv(rng, 1, 2, HKV, D)))
    state = (cache.k_pages.copy_to_host(), cache.k_scale.copy_to_host(),
             cache.seqlens.copy(), cache.block_table.copy())
    bad = _kv(rng, 1, 1, HKV, D)
    bad[0, 0, 1, 3] = np.nan
    with pytest.raises(AttentionError, match="k_new.*finite"):
        numba_attn.attention_with_kvcache(dev(_kv(rng, 1, 1, H, D)), cache, dev(bad),
                                          dev(_kv(rng, 1, 1, HKV, D)))
    with pytest.raises(TypeError, match="q: .*float32, float16 or bfloat16"):
        numba_attn.attention_with_kvcache(dev(_kv(rng, 1, 1, H, D).astype(np.float64)),
                                          cache)
    now = (cache.k_pages.copy_to_host(), cache.k_scale.copy_to_host(), cache.seqlens,
           cache.block_table)
    # bits, not values: device storage starts uninitialised (NaN scales are possible)
    assert all(np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                              np.ascontiguousarray(b).view(np.uint8))
               for a, b in zip(state, now))
