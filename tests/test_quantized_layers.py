"""8-bit KV caches under the layers: MultiHeadAttention over int8 / float8 caches
(contiguous and paged, fork), prefill then decode steps, against reference.py over the
dequantized cache contents (exact) and against the same layer over a float32 cache
(within the storage's bound); MLACache(dtype=np.int8) likewise."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn as na
from numba_attn import reference as ref
from numba_attn import reference_rope as rr

BOUND = {"int8": 3e-2, "float8_e4m3fn": 8e-2, "float8_e5m2": 0.2}  # of max |ref|


def _storage(name):
    if name == "int8":
        return np.dtype(np.int8)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(getattr(ml_dtypes, name))


def _cache(kind, dtype, batch, hkv, d, cap):
    if kind == "contiguous":
        return na.KVCache(batch, cap, hkv, d, dtype=dtype)
    return na.PagedKVCache(batch, batch * -(-cap // 3) + 2, 3, hkv, d, dtype=dtype,
                           max_seqlen=cap)


def _expected_step(layer, x_step, cache, theta):
    """The layer's output for ``x_step`` (batch, n, E) whose keys/values ``cache`` already
    holds (the last n positions of every row): q projected and rotated here in float64,
    attention by reference.py over the cache's dequantized rows, then o_proj."""
    bsz, n, _ = x_step.shape
    h, hd = layer.num_heads, layer.head_dim
    x64 = x_step.astype(np.float64)
    q = (x64 @ np.asarray(layer.w_q, np.float64).T).reshape(bsz, n, h, hd)
    cos, sin = rr.rotary_cos_sin(int(cache.seqlens.max()) + 1, hd, base=theta)
    outs = []
    for b in range(bsz):
        kq, vq = cache.dequantized_prefix(b)
        L = kq.shape[0]
        qb = rr.apply_rotary(q[b], cos, sin, np.arange(L - n, L))
        outs.append(ref.attention(qb[None], kq[None].astype(np.float64),
                                  vq[None].astype(np.float64), causal=True)[0])
    o = np.stack(outs).reshape(bsz, n, h * hd)
    return o @ np.asarray(layer.w_o, np.float64).T


@pytest.mark.parametrize("dtype", sorted(BOUND))
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_mha_prefill_and_decode_over_a_quantized_cache(kind, dtype):
    theta = 1e4
    layer = na.MultiHeadAttention(64, 4, 2, rope_theta=theta, seed=0)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 12, 64)).astype(np.float32)
    qc = _cache(kind, _storage(dtype), 2, 2, 16, 14)
    fc = _cache(kind, np.float32, 2, 2, 16, 14)
    chunks = [(0, 7), (7, 8), (8, 9), (9, 12)]  # prefill, two decode steps, a chunk of 3
    got, want = [], []
    for s0, s1 in chunks:
        y = layer(x[:, s0:s1], cache=qc)
        assert y.dtype == np.float32 and qc.seqlens.tolist() == [s1, s1]
        exact = _expected_step(layer, x[:, s0:s1], qc, theta)
        assert np.abs(y - exact).max() <= 2e-5 * np.abs(exact).max(), (s0, s1)
        got.append(y)
        want.append(layer(x[:, s0:s1], cache=fc))
    got, want = np.concatenate(got, 1), np.concatenate(want, 1)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= BOUND[dtype], err
    assert err > 0  # the cache really was quantized
    np.testing.assert_allclose(want, layer(x), rtol=1e-4, atol=1e-5)  # float32 cache = no cache


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_mha_over_a_forked_quantized_paged_cache(dtype):
    """Two rows share a prompt through fork; each then decodes its own tokens
    (copy-on-write of the partial page and its scales)."""
    theta = 1e4
    layer = na.MultiHeadAttention(32, 4, 1, rope_theta=theta, seed=1)
    rng = np.random.default_rng(8)
    prompt = rng.standard_normal((1, 5, 32)).astype(np.float32)
    cache = na.PagedKVCache(2, 8, 3, 1, 8, dtype=_storage(dtype))
    single = na.PagedKVCache(1, 4, 3, 1, 8, dtype=_storage(dtype))
    # row 0 holds the prompt; row 1 gets it by fork
    pad = np.zeros((2, 5, 32), np.float32)
    pad[0] = prompt[0]
    layer(pad, cache=cache)
    cache.free(1)
    cache.fork(0, 1)
    layer(prompt, cache=single)
    steps = rng.standard_normal((2, 3, 32)).astype(np.float32)
    for t in range(3):
        y = layer(steps[:, t:t + 1], cache=cache)
        exact = _expected_step(layer, steps[:, t:t + 1], cache, theta)
        assert np.abs(y - exact).max() <= 2e-5 * np.abs(exact).max()
        y0 = layer(steps[:1, t:t + 1], cache=single)  # row 0 alone: the same numbers
        np.testing.assert_allclose(y[:1], y0, rtol=1e-6, atol=1e-7)
    assert cache.block_table[0, 1] != cache.block_table[1, 1]  # copied on write
    assert cache.block_table[0, 0] == cache.block_table[1, 0]  # full page still shared


def _mla_over_latent(m, params, x_step, pos, lat, kpe):
    """DeepSeek's equations (tests/test_mla.py) for queries ``x_step`` (1, n, E) at
    positions ``pos`` over given latents ``lat`` (L, r) and rope keys ``kpe`` (L, dr) (the
    cache's dequantized rows), in float64: naive form, causal, o_proj."""
    from test_mla import rms, rope_every_two

    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h, dn, dr, dv = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    x = x_step.astype(np.float64)
    n = x.shape[1]
    q = rms(x @ P["q_a_proj.weight"].T, P["q_a_layernorm.weight"], m.norm_eps)
    q = (q @ P["q_b_proj.weight"].T).reshape(1, n, h, dn + dr)
    q = np.concatenate([q[..., :dn], rope_every_two(q[..., dn:], pos[None], m.rope_theta)],
                       -1)[0]
    kv = (lat @ P["kv_b_proj.weight"].T).reshape(-1, h, dn + dv)
    k = np.concatenate([kv[..., :dn], np.broadcast_to(kpe[:, None], (len(lat), h, dr))], -1)
    o = ref.attention(q[None], k[None], kv[None, ..., dn:], causal=True)[0]
    return o.reshape(n, h * dv) @ P["o_proj.weight"].T


@pytest.mark.parametrize("dtype", sorted(BOUND))
def test_mla_latent_cache_8bit(dtype):
    from test_mla import SHAPES, randomise

    rng = np.random.default_rng(9)
    m = na.MultiHeadLatentAttention(**SHAPES["v3-like-small"], seed=4, rope_theta=1e4)
    params = randomise(m, rng)
    x = rng.standard_normal((2, 9, m.hidden_size)).astype(np.float32)
    qc, fc = m.new_cache(2, 12, dtype=_storage(dtype)), m.new_cache(2, 12)
    assert qc.kv.dtype == _storage(dtype) and qc.scale.shape == (2, 12, 1)
    assert qc.bytes_per_token == m.kv_lora_rank + m.qk_rope_head_dim + 4
    got, want = [], []
    for s0, s1 in [(0, 5), (5, 6), (6, 7), (7, 9)]:
        y = m(x[:, s0:s1], cache=qc)
        for b in range(2):
            rows = qc.dequantized_prefix(b).astype(np.float64)
            exact = _mla_over_latent(m, params, x[b:b + 1, s0:s1], np.arange(s0, s1),
                                     rows[:, :m.kv_lora_rank], rows[:, m.kv_lora_rank:])
            assert np.abs(y[b] - exact).max() <= 2e-5 * np.abs(exact).max(), (s0, b)
        got.append(y)
        want.append(m(x[:, s0:s1], cache=fc))
    got, want = np.concatenate(got, 1), np.concatenate(want, 1)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err <= BOUND[dtype], err


def test_mla_8bit_cache_errors():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(TypeError, match="dtype.*int16"):
        na.MLACache(1, 4, 8, 2, dtype=np.int16)
    m = na.MultiHeadLatentAttention(32, 2, kv_lora_rank=8, qk_nope_head_dim=4,
                                    qk_rope_head_dim=2, v_head_dim=4, dtype=np.float64,
                                    seed=0)
    cache = na.MLACache(1, 4, 8, 2, dtype=np.int8)
    with pytest.raises(na.AttentionError, match="cache.*float32 layers"):
        m(np.zeros((1, 1, 32)), cache=cache)
    assert cache.seqlens.tolist() == [0]
    m32 = na.MultiHeadLatentAttention(32, 2, kv_lora_rank=8, qk_nope_head_dim=4,
                                      qk_rope_head_dim=2, v_head_dim=4, seed=0)
    cache = na.MLACache(1, 4, 8, 2, dtype=ml_dtypes.float8_e4m3fn)
    x = np.ones((1, 2, 32), np.float32)
    x[0, 1, 5] = np.inf
    with pytest.raises(na.AttentionError, match="x: .*finite"), np.errstate(all="ignore"):
        m32(x, cache=cache)  # (numpy's own inf arithmetic in the projections: silenced)
    assert cache.seqlens.tolist() == [0] and not cache.kv.view(np.uint8).any()
