"""MultiHeadLatentAttention against a float64 implementation of DeepSeek-V2's equations
(section 2.1 of the paper; Hugging Face's DeepseekV3Attention), written here: low-rank
query, latent kv with RMSNorm, rotary (GPT-J interleaved pairs) on the decoupled rope part
only, one rope key shared by every head, softmax attention, output projection."""
import math

import numpy as np
import pytest

import numba_attn
from numba_attn import AttentionError, MLACache, MultiHeadLatentAttention


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_every_two(x, pos, theta, inv=None, mscale=1.0):
    """GPT-J rotate_every_two on the whole last axis; x (B, S, H, R), pos (B, S)."""
    r = x.shape[-1]
    if inv is None:
        inv = 1.0 / theta ** (np.arange(0, r, 2) / r)
    ang = pos[..., None, None] * inv  # (B, S, 1, R/2)
    cos = np.repeat(np.cos(ang), 2, -1) * mscale
    sin = np.repeat(np.sin(ang), 2, -1) * mscale
    rot = np.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
    return x * cos + rot * sin


def ref_mla(m, params, x, positions=None, kv_lens=None, inv=None, mscale=1.0, scale=None):
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    b, s, _ = x.shape
    h, dn, dr, dv, r = (m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim,
                        m.kv_lora_rank)
    pos = np.broadcast_to(np.arange(s) if positions is None else positions, (b, s))

    def lin(name, t):
        y = t @ P[name + ".weight"].T
        return y + P[name + ".bias"] if name + ".bias" in P else y

    if "q_proj.weight" in P:
        q = lin("q_proj", x)
    else:
        q = lin("q_b_proj", rms(lin("q_a_proj", x), P["q_a_layernorm.weight"], m.norm_eps))
    q = q.reshape(b, s, h, dn + dr)
    ckv = lin("kv_a_proj_with_mqa", x)
    c = rms(ckv[..., :r], P["kv_a_layernorm.weight"], m.norm_eps)
    k_pe = rope_every_two(ckv[..., None, r:], pos, m.rope_theta, inv, mscale)
    kv = lin("kv_b_proj", c).reshape(b, s, h, dn + dv)
    k = np.concatenate([kv[..., :dn], np.broadcast_to(k_pe, (b, s, h, dr))], -1)
    qq = np.concatenate([q[..., :dn], rope_every_two(q[..., dn:], pos, m.rope_theta, inv,
                                                     mscale)], -1)
    sc = np.einsum("bihd,bjhd->bhij", qq, k) * ((dn + dr) ** -0.5 if scale is None else scale)
    ok = np.tril(np.ones((s, s), bool))[None, None]
    if kv_lens is not None:
        ok = ok & (np.arange(s) < np.asarray(kv_lens)[:, None, None, None])
    sc = np.where(ok, sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bihd", p, kv[..., dn:]).reshape(b, s, h * dv)
    return lin("o_proj", o)


def randomise(m, rng):
    sd = m.state_dict()
    for n in sd:
        if n.endswith(".bias") or "layernorm" in n:
            sd[n] = (rng.standard_normal(sd[n].shape) * 0.3 + ("layernorm" in n)).astype(m.dtype)
    m.load_state_dict(sd)
    return sd


SHAPES = {
    "v3-like-small": dict(hidden_size=64, num_heads=4, q_lora_rank=24, kv_lora_rank=32,
                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
    "v2-lite-no-qlora": dict(hidden_size=48, num_heads=3, q_lora_rank=None, kv_lora_rank=20,
                             qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=10),
    "bias-vdim-ne-nope": dict(hidden_size=64, num_heads=2, q_lora_rank=16, kv_lora_rank=24,
                              qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=20,
                              attention_bias=True),
}
TOL = {np.float32: dict(rtol=3e-4, atol=3e-5), np.float64: dict(rtol=1e-10, atol=1e-11)}


def _make(name, dtype, rng):
    m = MultiHeadLatentAttention(**SHAPES[name], dtype=dtype, seed=4, rope_theta=10000.0)
    return m, randomise(m, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_naive_prefill_matches_equations(rng, name, dtype):
    m, params = _make(name, dtype, rng)
    x = rng.standard_normal((2, 7, m.hidden_size)).astype(dtype)
    got = m(x)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_allclose(got, ref_mla(m, params, x), **TOL[dtype])


def test_naive_prefill_on_cuda_backend(rng):
    why = numba_attn.available_backends().get("cuda", "no CUDA backend registered")
    if why:
        pytest.skip(f"cuda backend unavailable: {why}")
    m, params = _make("bias-vdim-ne-nope", np.float32, rng)
    x = rng.standard_normal((2, 5, m.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(m(x, backend="cuda"), ref_mla(m, params, x), **TOL[np.float32])


def yarn_get_mscale(scale, mscale):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def ref_yarn_inv_freq(d, base, factor, old, beta_fast, beta_slow):
    """DeepSeek-V2's DeepseekV2YarnRotaryEmbedding frequencies."""
    def correction_dim(n_rot):
        return (d * math.log(old / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / ((high - low) or 0.001), 0, 1)
    mask = 1.0 - ramp
    pos_freqs = base ** (np.arange(0, d, 2) / d)
    return 1.0 / (factor * pos_freqs) * (1 - mask) + 1.0 / pos_freqs * mask


def test_deepseek_yarn_rope_and_mscale(rng):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}
    m = MultiHeadLatentAttention(**SHAPES["v3-like-small"], rope_scaling=yarn,
                                 dtype=np.float64, seed=5)
    params = randomise(m, rng)
    x = rng.standard_normal((1, 7, 64))
    inv = ref_yarn_inv_freq(8, 10000.0, 4.0, 64, 32, 1)
    assert not np.allclose(inv, 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8))  # yarn matters
    ms = yarn_get_mscale(4.0, 0.707) / yarn_get_mscale(4.0, 1.0)
    scale = 24 ** -0.5 * yarn_get_mscale(4.0, 1.0) ** 2
    expected = ref_mla(m, params, x, inv=inv, mscale=ms, scale=scale)
    np.testing.assert_allclose(m(x), expected, **TOL[np.float64])
    cache = m.new_cache(1, 8)
    got = np.concatenate([m(x[:, :6], cache=cache), m(x[:, 6:], cache=cache)], 1)
    np.testing.assert_allclose(got, expected, **TOL[np.float64])


def test_key_padding(rng):
    m, params = _make("v3-like-small", np.float64, rng)
    x = rng.standard_normal((2, 6, 64))
    kv_lens = np.array([6, 4])
    got = m(x, kv_lens=kv_lens)
    np.testing.assert_allclose(got, ref_mla(m, params, x, kv_lens=kv_lens), **TOL[np.float64])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_absorbed_decode_equals_naive(rng, name, dtype):
    m, params = _make(name, dtype, rng)
    x = rng.standard_normal((2, 9, m.hidden_size)).astype(dtype)
    naive = m(x)
    cache = m.new_cache(2, 16)
    parts = [m(x[:, :4], cache=cache), m(x[:, 4:7], cache=cache)]  # prefill, chunk
    parts += [m(x[:, t:t + 1], cache=cache) for t in (7, 8)]  # one-token steps
    got = np.concatenate(parts, axis=1)
    assert cache.seqlens.tolist() == [9, 9]
    np.testing.assert_allclose(got, naive, **TOL[dtype])
    np.testing.assert_allclose(got, ref_mla(m, params, x), **TOL[dtype])


def test_cache_stores_only_latent_and_rope_key(rng):
    m, params = _make("v3-like-small", np.float64, rng)
    x = rng.standard_normal((1, 5, 64))
    cache = m.new_cache(1, 8)
    m(x, cache=cache)
    assert cache.kv.shape == (1, 8, 1, m.kv_lora_rank + m.qk_rope_head_dim)
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    ckv = x @ P["kv_a_proj_with_mqa.weight"].T
    c = rms(ckv[..., :32], P["kv_a_layernorm.weight"], m.norm_eps)
    k_pe = rope_every_two(ckv[..., None, 32:], np.arange(5)[None], m.rope_theta)[:, :, 0]
    np.testing.assert_allclose(cache.latent[:, :5], c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.rope_key[:, :5], k_pe, rtol=1e-12, atol=1e-12)
    assert not cache.kv[:, 5:].any()


def test_rows_of_different_lengths(rng):
    m, params = _make("v2-lite-no-qlora", np.float64, rng)
    x = rng.standard_normal((2, 6, m.hidden_size))
    cache = m.new_cache(2, 8)
    m(x[:, :5], cache=cache)
    cache.seqlens[1] = 3  # roll row 1 back to 3 tokens
    step = np.stack([x[0, 5], x[1, 3]])[:, None]
    got = m(step, cache=cache)
    assert cache.seqlens.tolist() == [6, 4]
    ref0 = ref_mla(m, params, x[:1])[0, 5]
    ref1 = ref_mla(m, params, x[1:, :4])[0, 3]
    np.testing.assert_allclose(got[:, 0], np.stack([ref0, ref1]), **TOL[np.float64])


def test_state_dict_round_trip_and_strict(rng):
    m, sd = _make("v3-like-small", np.float32, rng)
    assert sorted(sd) == sorted(["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight",
                                 "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight",
                                 "kv_b_proj.weight", "o_proj.weight"])
    assert sd["kv_b_proj.weight"].shape == (4 * (16 + 16), 32)
    other = MultiHeadLatentAttention(**SHAPES["v3-like-small"], seed=9)
    other.load_state_dict(m.state_dict("model.layers.0.self_attn."),
                          prefix="model.layers.0.self_attn.")
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    np.testing.assert_array_equal(other(x), m(x))
    bad = dict(sd)
    bad.pop("kv_b_proj.weight")
    bad["q_proj.weight"] = np.ones((4 * 24, 64), np.float32)
    with pytest.raises(AttentionError, match="missing: kv_b_proj.weight.*unexpected: "
                                             "q_proj.weight"):
        other.load_state_dict(bad)


def test_from_hf_config_deepseek():
    v2_lite = {"model_type": "deepseek_v2", "hidden_size": 2048, "num_attention_heads": 16,
               "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
               "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 10000,
               "rms_norm_eps": 1e-6}
    m = MultiHeadLatentAttention.from_hf_config(v2_lite, seed=0)
    assert m.w_q.shape == (16 * 192, 2048) and m.w_q_a is None
    assert m.scale == pytest.approx(192 ** -0.5)
    v3 = dict(v2_lite, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536,
              rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                            "beta_fast": 32, "beta_slow": 1})
    shapes = {n: s for n, _, s in MultiHeadLatentAttention.from_hf_config(
        dict(v3, hidden_size=64, num_attention_heads=2), seed=0)._param_specs()}
    assert shapes["q_b_proj.weight"] == (2 * 192, 1536)
    mscale = 0.1 * math.log(40) + 1
    m3 = MultiHeadLatentAttention.from_hf_config(dict(v3, hidden_size=64,
                                                      num_attention_heads=2), seed=0)
    assert m3.scale == pytest.approx(192 ** -0.5 * mscale ** 2)


@pytest.mark.parametrize("call, exc, word", [
    (lambda m, c, x: m(x, cache=c, kv_lens=np.array([1])), AttentionError, "kv_lens"),
    (lambda m, c, x: m(x, cache=MLACache(1, 8, 16, 8)), AttentionError, "cache"),
    (lambda m, c, x: m(x, cache=numba_attn.KVCache(1, 8, 1, 40)), TypeError, "cache"),
    (lambda m, c, x: m(np.concatenate([x, x, x], 1), cache=c), AttentionError, "overflow"),
], ids=["kv_lens-with-cache", "cache-shape", "cache-type", "overflow"])
def test_bad_input_leaves_cache_untouched(rng, call, exc, word):
    m, _ = _make("v3-like-small", np.float32, rng)
    cache = m.new_cache(1, 8)
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    m(x, cache=cache)
    before = cache.kv.copy()
    with pytest.raises(exc, match=word):
        call(m, cache, x)
    assert cache.seqlens.tolist() == [3]
    np.testing.assert_array_equal(cache.kv, before)


def test_absorbed_decode_allocations_do_not_grow_with_cache(rng):
    import tracemalloc

    m, _ = _make("v3-like-small", np.float32, rng)
    x = rng.standard_normal((1, 1, 64)).astype(np.float32)

    def peak(n):
        cache = m.new_cache(1, n)
        cache.seqlens[:] = n - 4
        m(x, cache=cache)  # warm-up
        cache.seqlens[:] = n - 4
        tracemalloc.start()
        m(x, cache=cache)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, big = peak(512), peak(16384)
    # a copy of the latent cache would cost 16384 * 40 * 4 bytes
    assert big < small + 64 * 1024, (small, big)
