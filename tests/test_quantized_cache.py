"""int8 KV caches (numba_attn.quant): quantization, the decode kernel against the
reference over the dequantized cache and over the float data, paging, fork, errors."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import property_cases as pc
import pytest

import numba_attn as na
from numba_attn import quant
from numba_attn import reference as ref
from numba_attn.config import AttentionError

HERE = os.path.dirname(os.path.abspath(__file__))


def _kv(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_quantize_rounds_to_nearest_even_with_absmax_scale():
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -126.5],  # scale 1: ties to even
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                  [-254.0, 1.0, 3.0, -3.0, 254.0, 0.0]], np.float32)
    q, s = quant.quantize(x)
    assert q.dtype == np.int8 and s.dtype == np.float32
    np.testing.assert_array_equal(s, [1.0, 0.0, 2.0])
    np.testing.assert_array_equal(q[0], [127, 0, 2, 2, 0, -126])
    np.testing.assert_array_equal(q[1], 0)
    np.testing.assert_array_equal(q[2], [-127, 0, 2, -2, 127, 0])  # 0.5, 1.5 -> 0, 2
    rng = np.random.default_rng(0)
    y = rng.standard_normal((50, 3, 64)).astype(np.float32)
    q, s = quant.quantize(y)
    err = np.abs(quant.dequantize(q, s) - y)
    assert (err <= s[..., None] * (0.5 + 1e-6)).all()
    assert (np.abs(q).max(axis=-1) == 127).all()


def test_quantize_float8_e4m3fn():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    f8 = np.dtype(ml_dtypes.float8_e4m3fn)
    x = np.array([[448.0, 1.0, -3.25, 0.0, 17.0, 1.0 / 1024]], np.float32)  # scale 1
    q, s = quant.quantize(x, f8)
    assert q.dtype == f8 and s.tolist() == [1.0]
    np.testing.assert_array_equal(q.astype(np.float32), x.astype(f8).astype(np.float32))
    assert q.astype(np.float32)[0, 4] == 16.0  # 17 -> 16 (3 mantissa bits, ties to even)
    rng = np.random.default_rng(0)
    y = rng.standard_normal((40, 2, 64)).astype(np.float32)
    q, s = quant.quantize(y, f8)
    assert np.isfinite(q.astype(np.float32)).all()
    err = np.abs(quant.dequantize(q, s) - y)
    assert (err <= np.abs(y) * 2.0 ** -4 + s[..., None] * 2.0 ** -9).all()


def test_quantize_float8_e5m2():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    f8 = np.dtype(ml_dtypes.float8_e5m2)
    x = np.array([[57344.0, 1.0, -3.0, 0.0, 5.0, 2.0 ** -16]], np.float32)  # scale 1
    q, s = quant.quantize(x, f8)
    assert q.dtype == f8 and s.tolist() == [1.0]
    np.testing.assert_array_equal(q.astype(np.float32), [[57344.0, 1.0, -3.0, 0.0, 5.0,
                                                          2.0 ** -16]])  # subnormal min
    y = np.random.default_rng(0).standard_normal((40, 2, 64)).astype(np.float32)
    q, s = quant.quantize(y, f8)
    err = np.abs(quant.dequantize(q, s) - y)
    assert (err <= np.abs(y) * 2.0 ** -3 + s[..., None] * 2.0 ** -17).all()


def _storage(name):
    if name == "int8":
        return np.dtype(np.int8)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(getattr(ml_dtypes, name))


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_append_stores_values_and_scales(kind):
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 2, 5, 2, 8), _kv(rng, 2, 5, 2, 8)
    k[1, 2, 1] = 0.0  # an all-zero row: scale 0
    if kind == "contiguous":
        c = na.KVCache(2, 8, 2, 8, dtype=np.int8)
    else:
        c = na.PagedKVCache(2, 8, 3, 2, 8, dtype=np.int8)
    assert c.k_scale.dtype == np.float32 and c.k_scale.shape[-1] == 2
    c.append(k, v)
    for r in range(2):
        kq, vq = c.prefix(r)
        ks, vs = c.prefix_scales(r)
        assert kq.dtype == np.int8
        wk, wks = quant.quantize(k[r])
        np.testing.assert_array_equal(kq, wk)
        np.testing.assert_array_equal(ks, wks)
        np.testing.assert_array_equal(vs, quant.quantize(v[r])[1])
        np.testing.assert_allclose(c.dequantized_prefix(r)[0], quant.dequantize(wk, wks))
    assert c.prefix_scales(1)[0][2, 1] == 0.0


def _reference_rows(q, cache, **kw):
    outs = []
    for r in range(q.shape[0]):
        kq, vq = cache.dequantized_prefix(r)
        outs.append(ref.attention(q[r:r + 1].astype(np.float32), kq[None], vq[None], **kw)[0])
    return np.stack(outs)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("sq", [1, 3, 40])  # decode kernel; 40 x group 4: the prefill path
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decode_and_prefill_match_reference(kind, sq, dtype):
    cdt = _storage(dtype)
    rng = np.random.default_rng(2)
    b, hkv, g, d, n0 = 2, 2, 4, 64, 1100  # split-KV length
    if kind == "contiguous":
        c = na.KVCache(b, 1200, hkv, d, dtype=cdt)
    else:
        c = na.PagedKVCache(b, 2 * 1200 // 7 + 4, 7, hkv, d, dtype=cdt, max_seqlen=1200)
    kf, vf = _kv(rng, b, n0, hkv, d), _kv(rng, b, n0, hkv, d)
    c.append(kf, vf)
    q = _kv(rng, b, sq, hkv * g, d)
    kn, vn = _kv(rng, b, sq, hkv, d), _kv(rng, b, sq, hkv, d)
    out = na.attention_with_kvcache(q, c, kn, vn, causal=True)
    assert out.dtype == np.float32
    exact = _reference_rows(q, c, causal=True)
    assert np.abs(out - exact).max() <= 1e-5 * np.abs(exact).max()
    floatref = ref.attention(q, np.concatenate([kf, kn], 1), np.concatenate([vf, vn], 1),
                             causal=True)
    bound = {"int8": 3e-2, "float8_e4m3fn": 8e-2, "float8_e5m2": 0.2}[dtype]
    assert np.abs(out - floatref).max() <= bound * np.abs(floatref).max()
    # the reference backend reads the same dequantized rows
    o2 = na.attention_with_kvcache(q, c, causal=True, backend="reference")
    exact2 = _reference_rows(q, c, causal=True)
    assert o2.dtype == np.float32  # the reference backend rounds its output once
    np.testing.assert_allclose(o2, exact2, rtol=2e-7, atol=1e-7 * np.abs(exact2).max())


def test_half_q_returns_its_dtype():
    rng = np.random.default_rng(3)
    c = na.KVCache(1, 64, 1, 32, dtype=np.int8)
    c.append(_kv(rng, 1, 33, 1, 32), _kv(rng, 1, 33, 1, 32))
    q = _kv(rng, 1, 1, 2, 32).astype(np.float16)
    out = na.attention_with_kvcache(q, c)
    assert out.dtype == np.float16
    exact = _reference_rows(q, c)
    assert np.abs(out.astype(np.float64) - exact).max() <= 2e-3 * np.abs(exact).max()


def test_fork_copy_on_write_carries_scales():
    rng = np.random.default_rng(4)
    c = na.PagedKVCache(2, 8, 4, 1, 16, dtype=np.int8)
    k, v = _kv(rng, 2, 6, 1, 16), _kv(rng, 2, 6, 1, 16)
    c.append(k, v)
    c.fork(0, 1)  # row 1 shares row 0's two pages; the second is partial
    src_before = c.dequantized_prefix(0)
    q = _kv(rng, 2, 1, 2, 16)
    kn, vn = _kv(rng, 2, 1, 1, 16), _kv(rng, 2, 1, 1, 16)
    kn[1] *= 5.0  # row 1 appends something else: its copied page gets its own scale
    na.attention_with_kvcache(q, c, kn, vn)
    assert c.block_table[0, 1] != c.block_table[1, 1]  # copied on write
    assert c.block_table[0, 0] == c.block_table[1, 0]  # full page still shared
    for r in range(2):
        kr, vr = c.dequantized_prefix(r)
        np.testing.assert_array_equal(kr[:6], src_before[0])  # the shared prefix, scales too
        np.testing.assert_array_equal(vr[:6], src_before[1])
        wq, ws = quant.quantize(kn[r])
        np.testing.assert_array_equal(kr[6:], quant.dequantize(wq, ws))
    out = na.attention_with_kvcache(q, c)
    np.testing.assert_allclose(out, _reference_rows(q, c), rtol=1e-5, atol=1e-6)


def test_errors_name_the_argument_and_leave_the_cache_unchanged():
    with pytest.raises(TypeError, match="dtype"):
        na.KVCache(1, 8, 1, 8, dtype=np.int16)
    with pytest.raises(TypeError, match="dtype: unsupported dtype int16.*int8"):
        na.KVCache(1, 8, 1, 8, dtype=np.int16, device="cuda")  # int8 is a device dtype too
    rng = np.random.default_rng(5)
    c = na.PagedKVCache(1, 4, 3, 1, 8, dtype=np.int8)
    c.append(_kv(rng, 1, 2, 1, 8), _kv(rng, 1, 2, 1, 8))
    state = (c.k_pages.copy(), c.v_pages.copy(), c.k_scale.copy(), c.v_scale.copy(),
             c.seqlens.copy(), c.block_table.copy())

    def unchanged():
        now = (c.k_pages, c.v_pages, c.k_scale, c.v_scale, c.seqlens, c.block_table)
        return all(np.array_equal(a, b) for a, b in zip(state, now))

    with pytest.raises(TypeError, match="k_new.*float"):
        c.append(np.ones((1, 1, 1, 8), np.int8), _kv(rng, 1, 1, 1, 8))
    with pytest.raises(TypeError, match="v_new.*float"):
        c.append(_kv(rng, 1, 1, 1, 8), np.ones((1, 1, 1, 8), np.int32))
    bad = _kv(rng, 1, 1, 1, 8)
    bad[0, 0, 0, 3] = np.inf
    with pytest.raises(AttentionError, match="k_new.*finite"):
        c.append(bad, _kv(rng, 1, 1, 1, 8))
    with pytest.raises(TypeError, match="q: .*float32, float16 or bfloat16"):
        na.attention_with_kvcache(_kv(rng, 1, 1, 1, 8).astype(np.float64), c,
                                  _kv(rng, 1, 1, 1, 8), _kv(rng, 1, 1, 1, 8))
    with pytest.raises(AttentionError, match="out of pages|overflow"):
        na.attention_with_kvcache(_kv(rng, 1, 11, 1, 8), c, _kv(rng, 1, 11, 1, 8),
                                  _kv(rng, 1, 11, 1, 8))
    assert unchanged()
    with pytest.raises(AttentionError, match="no scales"):
        na.KVCache(1, 8, 1, 8).prefix_scales(0)


@pytest.mark.timeout(900)
def test_quantized_cache_property_matches_reference():
    cmd = [sys.executable, os.path.join(HERE, "quantized_cases.py"), "quantized_kvcache",
           "--examples", "40", "--keep-going"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=850)
    text = r.stdout + r.stderr
    assert r.returncode == 0, pc.report(r.returncode, text)
    assert "DONE quantized_kvcache: 0 failing" in text, pc.report(r.returncode, text)


def test_bench_int8_rows_compare_with_the_float32_cache(monkeypatch):
    import io

    from numba_attn import bench

    tiny = (bench._decode("tiny_decode", 64), bench._decode("tiny_decode_int8", 64,
                                                           dtype="int8"))
    assert bench.kv_bytes(tiny[1]) == 2 * 64 * 8 * (128 + 4)  # values and scales
    q, k, v = bench.make_inputs(tiny[1])
    assert k.dtype == np.float32 and bench.stored(tiny[1], k, v)[0].dtype == np.int8
    monkeypatch.setattr(bench, "QUICK_SHAPES", tiny)
    res = bench.run_bench(quick=True, peers=(), out=io.StringIO(), err=io.StringIO())
    rows = {r["name"]: r for r in res["rows"]}
    assert "int8 cache" in rows["tiny_decode_int8"]["label"]
    got = res["derived"]["tiny_decode_int8: speed / float32 cache speed (fastest samples)"]
    assert got == rows["tiny_decode"]["min_ms"] / rows["tiny_decode_int8"]["min_ms"]
