"""MultiHeadAttention against an independent float64 implementation written here from the
published formulas: Linear (x W^T + b), RMSNorm, rotary embeddings in Hugging Face's
rotate_half form (GPT-J's rotate_every_two for interleaved), Llama-3 frequency scaling as
in transformers' _compute_llama3_parameters, repeat_kv, masked softmax attention."""
import tracemalloc

import numpy as np
import pytest
from numerics import expected_inv_freq

import numba_attn
from numba_attn import AttentionError, MultiHeadAttention


def _backends():
    out = [pytest.param("cpu", id="cpu")]
    why = numba_attn.available_backends().get("cuda", "no CUDA backend registered")
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        bool(why), reason=f"cuda backend unavailable: {why}")))
    return out


# ---------------------------------------------------------------------------------------
# the float64 oracle
# ---------------------------------------------------------------------------------------
def ref_rope(x, pos, inv, interleaved):
    """x (B, S, H, D), pos (B, S): rotate the first 2 * len(inv) channels."""
    r = 2 * len(inv)
    ang = pos[..., None].astype(np.float64) * inv  # (B, S, R/2)
    xr, rest = x[..., :r], x[..., r:]
    if interleaved:  # GPT-J rotate_every_two
        cos = np.repeat(np.cos(ang), 2, axis=-1)[:, :, None]
        sin = np.repeat(np.sin(ang), 2, axis=-1)[:, :, None]
        rot = np.stack([-xr[..., 1::2], xr[..., ::2]], axis=-1).reshape(xr.shape)
    else:  # GPT-NeoX / Llama rotate_half
        cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None]
        sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None]
        rot = np.concatenate([-xr[..., r // 2:], xr[..., :r // 2]], axis=-1)
    return np.concatenate([xr * cos + rot * sin, rest], axis=-1)


def ref_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def ref_attention(q, k, v, *, scale, causal, sliding_window=None, softcap=0.0,
                  kv_lens=None, mask=None):
    b, s, h, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    k = np.repeat(k, h // hkv, axis=2)
    v = np.repeat(v, h // hkv, axis=2)
    sc = np.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap:
        sc = softcap * np.tanh(sc / softcap)
    i = np.arange(s)[:, None] + (sk - s)
    j = np.arange(sk)[None, :]
    ok = np.ones((b, 1, s, sk), bool)
    if causal:
        ok &= j <= i
        if sliding_window is not None:
            ok &= i - j < sliding_window
    if kv_lens is not None:
        ok &= j[None, None] < np.asarray(kv_lens)[:, None, None, None]
    if mask is not None:
        ok = ok & mask
    sc = np.where(ok, sc, -np.inf)
    m = sc.max(-1, keepdims=True)
    p = np.where(ok, np.exp(sc - np.where(np.isfinite(m), m, 0)), 0.0)
    den = p.sum(-1, keepdims=True)
    p = p / np.where(den > 0, den, 1)
    return np.einsum("bhij,bjhd->bihd", p, v)


def ref_forward(layer, params, x, *, context=None, positions=None, kv_lens=None, mask=None,
                lora=None, lora_scale=1.0):
    """The layer's math in float64 from its Hugging Face-named parameters."""
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    lora = {n: tuple(np.asarray(a, np.float64) for a in ab) for n, ab in (lora or {}).items()}

    def lin(name, t, key):
        y = t @ P[f"{name}.weight"].T
        if f"{name}.bias" in P:
            y = y + P[f"{name}.bias"]
        if key in lora:
            a, bb = lora[key]
            y = y + lora_scale * (t @ a.T) @ bb.T
        return y

    x = np.asarray(x, np.float64)
    src = x if context is None else np.asarray(context, np.float64)
    b, s, _ = x.shape
    hd, h, hkv = layer.head_dim, layer.num_heads, layer.num_kv_heads
    q = lin("q_proj", x, "q").reshape(b, s, h, hd)
    k = lin("k_proj", src, "k").reshape(b, src.shape[1], hkv, hd)
    v = lin("v_proj", src, "v").reshape(b, src.shape[1], hkv, hd)
    if "q_norm.weight" in P:
        q = ref_rms(q, P["q_norm.weight"], layer.norm_eps)
        k = ref_rms(k, P["k_norm.weight"], layer.norm_eps)
    if layer.rope_theta is not None and context is None:
        pos = np.broadcast_to(np.arange(s) if positions is None else positions, (b, s))
        inv = expected_inv_freq(int(hd * layer.partial_rotary_factor), layer.rope_theta,
                           layer.rope_scaling)
        q = ref_rope(q, pos, inv, layer.rotary_interleaved)
        k = ref_rope(k, pos, inv, layer.rotary_interleaved)
    o = ref_attention(q, k, v, scale=layer.scale, causal=layer.causal and context is None,
                      sliding_window=layer.sliding_window, softcap=layer.softcap,
                      kv_lens=kv_lens, mask=mask)
    return lin("o_proj", o.reshape(b, s, h * hd), "o")


def randomise(layer, rng):
    """Random biases and norm gains (the constructor makes them 0 and 1)."""
    sd = layer.state_dict()
    for name in sd:
        if name.endswith(".bias") or "norm" in name:
            sd[name] = (rng.standard_normal(sd[name].shape) * 0.5 + ("norm" in name)).astype(
                layer.dtype)
    layer.load_state_dict(sd)
    return sd


def assert_close(got, expected, dtype):
    tol = {np.float32: 3e-5, np.float64: 1e-11}[np.dtype(dtype).type]
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=tol * 10,
                               atol=tol * max(1.0, np.abs(expected).max()))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "mha": (48, 4, None, {}),
    "gqa-bias": (64, 8, 2, dict(qkv_bias=True, out_bias=True)),
    "mqa-headdim24": (64, 4, 1, dict(head_dim=24)),
    "gqa-rope": (64, 8, 2, dict(rope_theta=10000.0)),
    "gqa-rope-partial-hd40": (64, 4, 2, dict(head_dim=40, rope_theta=10000.0,
                                             partial_rotary_factor=0.5)),
    "gqa-rope-llama3": (64, 4, 2, dict(head_dim=32, rope_theta=500000.0,
                                       rope_scaling=LLAMA3)),
    "mha-rope-linear-interleaved": (48, 4, None, dict(
        rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0},
        rotary_interleaved=True)),
    "qwen3-qknorm": (64, 4, 2, dict(head_dim=32, qk_norm=True, rope_theta=1e6,
                                    norm_eps=1e-6)),
    "sliding-window-3": (48, 4, 2, dict(rope_theta=10000.0, sliding_window=3)),
    "softcap-scale": (64, 4, 2, dict(head_dim=32, softcap=3.0, scale=0.4,
                                     rope_theta=10000.0)),
    "bidirectional": (48, 4, None, dict(causal=False, qkv_bias=True)),
}


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", list(CASES))
def test_self_attention_matches_formulas(rng, case, backend):
    hidden, h, hkv, kw = CASES[case]
    layer = MultiHeadAttention(hidden, h, hkv, seed=1, **kw)
    params = randomise(layer, rng)
    x = rng.standard_normal((2, 9, hidden)).astype(np.float32)
    got = layer(x, backend=backend)
    assert_close(got, ref_forward(layer, params, x), np.float32)


def test_float64_is_tight(rng):
    layer = MultiHeadAttention.gqa(64, 8, 2, qk_norm=True, rope_theta=1e4, qkv_bias=True,
                                   dtype=np.float64, seed=3)
    params = randomise(layer, rng)
    x = rng.standard_normal((2, 11, 64))
    assert_close(layer(x), ref_forward(layer, params, x), np.float64)


def test_explicit_positions_per_row(rng):
    layer = MultiHeadAttention.gqa(64, 4, 2, rope_theta=10000.0, seed=2)
    params = layer.state_dict()
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    pos = np.array([[3, 4, 5, 6, 7], [100, 101, 102, 103, 104]])
    assert_close(layer(x, positions=pos), ref_forward(layer, params, x, positions=pos),
                 np.float32)


def test_key_padding_and_mask(rng):
    layer = MultiHeadAttention.mha(48, 4, causal=False, qkv_bias=True, out_bias=True, seed=4)
    params = randomise(layer, rng)
    x = rng.standard_normal((3, 7, 48)).astype(np.float32)
    kv_lens = np.array([7, 3, 1])
    mask = rng.random((3, 1, 7, 7)) < 0.8
    mask[..., 0] = True  # every query sees at least one key
    got = layer(x, kv_lens=kv_lens, mask=mask)
    assert_close(got, ref_forward(layer, params, x, kv_lens=kv_lens, mask=mask), np.float32)


@pytest.mark.parametrize("backend", _backends())
def test_cross_attention(rng, backend):
    layer = MultiHeadAttention.gqa(64, 8, 4, qkv_bias=True, rope_theta=1e4, seed=6)
    params = randomise(layer, rng)
    x = rng.standard_normal((2, 4, 64)).astype(np.float32)
    ctx = rng.standard_normal((2, 13, 64)).astype(np.float32)
    kv_lens = np.array([13, 6])
    got = layer(x, context=ctx, kv_lens=kv_lens, backend=backend)
    expected = ref_forward(layer, params, x, context=ctx, kv_lens=kv_lens)
    assert_close(got, expected, np.float32)


def _lora(rng, layer, rank, zero_b=False):
    e, hd = layer.hidden_size, layer.head_dim
    shapes = {"q": (layer.num_heads * hd, e), "k": (layer.num_kv_heads * hd, e),
              "v": (layer.num_kv_heads * hd, e), "o": (e, layer.num_heads * hd)}
    out = {}
    for n, (o, i) in shapes.items():
        a = rng.standard_normal((rank, i)).astype(np.float32) * 0.2
        b = np.zeros((o, rank), np.float32) if zero_b else \
            rng.standard_normal((o, rank)).astype(np.float32) * 0.2
        out[n] = (a, b)
    return out


def test_lora_on_every_projection(rng):
    layer = MultiHeadAttention.gqa(64, 4, 2, rope_theta=1e4, qkv_bias=True, seed=7)
    params = randomise(layer, rng)
    x = rng.standard_normal((2, 6, 64)).astype(np.float32)
    lora = _lora(rng, layer, rank=3)
    got = layer(x, lora=lora, lora_scale=0.5)
    assert_close(got, ref_forward(layer, params, x, lora=lora, lora_scale=0.5), np.float32)
    assert np.abs(got - layer(x)).max() > 1e-2  # the adapters matter


def test_lora_with_zero_b_is_no_lora(rng):
    layer = MultiHeadAttention.gqa(64, 4, 2, rope_theta=1e4, seed=8)
    x = rng.standard_normal((1, 5, 64)).astype(np.float32)
    np.testing.assert_array_equal(layer(x, lora=_lora(rng, layer, 4, zero_b=True)), layer(x))


def test_lora_subset(rng):
    layer = MultiHeadAttention.mha(48, 4, seed=9)
    params = layer.state_dict()
    x = rng.standard_normal((1, 5, 48)).astype(np.float32)
    lora = {"v": _lora(rng, layer, 2)["v"]}
    assert_close(layer(x, lora=lora, lora_scale=2.0),
                 ref_forward(layer, params, x, lora=lora, lora_scale=2.0), np.float32)


# ---------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------
def test_state_dict_round_trip(rng):
    kw = dict(qkv_bias=True, out_bias=True, qk_norm=True, head_dim=16, rope_theta=1e4)
    a = MultiHeadAttention.gqa(64, 4, 2, seed=10, **kw)
    randomise(a, rng)
    sd = a.state_dict("model.layers.3.self_attn.")
    assert sorted(sd) == sorted("model.layers.3.self_attn." + n for n in (
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_proj.bias",
        "k_proj.bias", "v_proj.bias", "o_proj.bias", "q_norm.weight", "k_norm.weight"))
    assert sd["model.layers.3.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert sd["model.layers.3.self_attn.o_proj.weight"].shape == (64, 4 * 16)
    b = MultiHeadAttention.gqa(64, 4, 2, seed=11, **kw)
    sd["model.embed_tokens.weight"] = np.zeros((10, 64), np.float32)  # outside the prefix
    b.load_state_dict(sd, prefix="model.layers.3.self_attn.")
    x = rng.standard_normal((1, 4, 64)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))
    names = [n for n, _ in b.named_parameters("p.")]
    assert names == list(b.state_dict("p."))
    assert all(arr is getattr(b, attr) for (_, arr), (_, attr, _) in
               zip(b.named_parameters(), b._param_specs()))


def test_out_proj_alias_and_merged_qkv(rng):
    a = MultiHeadAttention.gqa(64, 4, 2, qkv_bias=True, out_bias=True, seed=12)
    randomise(a, rng)
    sd = a.state_dict()
    merged = {
        "qkv_proj.weight": np.concatenate([sd["q_proj.weight"], sd["k_proj.weight"],
                                           sd["v_proj.weight"]]),
        "qkv_proj.bias": np.concatenate([sd["q_proj.bias"], sd["k_proj.bias"],
                                         sd["v_proj.bias"]]),
        "out_proj.weight": sd["o_proj.weight"], "out_proj.bias": sd["o_proj.bias"]}
    b = MultiHeadAttention.gqa(64, 4, 2, qkv_bias=True, out_bias=True, seed=13)
    b.load_state_dict(merged)
    for name, arr in b.state_dict().items():
        np.testing.assert_array_equal(arr, sd[name], err_msg=name)


def _weights(layer):
    return {n: a.copy() for n, a in layer.named_parameters()}


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.pop("v_proj.weight"), ["missing", "v_proj.weight"]),
    (lambda sd: sd.__setitem__("rotary_emb.inv_freq", np.ones(4)), ["unexpected",
                                                                     "rotary_emb.inv_freq"]),
    (lambda sd: sd.__setitem__("k_proj.weight", np.ones((3, 64))), ["mis-shaped",
                                                                     "k_proj.weight", "(3, 64)"]),
    (lambda sd: sd.__setitem__("out_proj.weight", sd["o_proj.weight"]), ["duplicated",
                                                                          "o_proj.weight"]),
    (lambda sd: sd.__setitem__("qkv_proj.weight", np.ones((5, 64))), ["qkv_proj.weight"]),
], ids=["missing", "unexpected", "mis-shaped", "duplicate-alias", "bad-merged"])
def test_strict_loading_errors(rng, edit, words):
    layer = MultiHeadAttention.gqa(64, 4, 2, seed=14)
    before = _weights(layer)
    sd = MultiHeadAttention.gqa(64, 4, 2, seed=15).state_dict()
    edit(sd)
    with pytest.raises(AttentionError) as e:
        layer.load_state_dict(sd)
    for w in words:
        assert w in str(e.value)
    for n, arr in layer.named_parameters():
        np.testing.assert_array_equal(arr, before[n])  # nothing loaded


def test_strict_loading_lists_every_problem_at_once():
    layer = MultiHeadAttention.gqa(64, 4, 2, qkv_bias=True, seed=16)
    before = _weights(layer)
    sd = layer.state_dict()
    sd.pop("q_proj.bias")
    sd["bogus.weight"] = np.ones(3)
    sd["o_proj.weight"] = np.ones((64, 65), np.float32)
    sd["q_proj.weight"] = sd["q_proj.weight"] + 1  # a valid entry: must not be loaded
    with pytest.raises(AttentionError) as e:
        layer.load_state_dict(sd)
    msg = str(e.value)
    assert "missing: q_proj.bias" in msg and "unexpected: bogus.weight" in msg
    assert "mis-shaped: o_proj.weight" in msg and "nothing loaded" in msg
    np.testing.assert_array_equal(layer.w_q, before["q_proj.weight"])


# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------
def test_from_hf_config_llama3():
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
           "attention_bias": False, "rope_scaling": {
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    layer = MultiHeadAttention.from_hf_config(cfg, seed=0)
    assert (layer.head_dim, layer.num_kv_heads, layer.is_gqa) == (128, 8, True)
    assert layer.rope_scaling["rope_type"] == "llama3" and layer.rope_theta == 5e5
    assert layer.b_q is None and layer.sliding_window is None and not layer.qk_norm
    assert layer.scale == pytest.approx(128 ** -0.5)
    # transformers >= 5 nests theta and scaling in "rope_parameters"
    v5 = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(cfg["rope_scaling"], rope_theta=500000.0)
    layer5 = MultiHeadAttention.from_hf_config(dict(v5, hidden_size=256,
                                                    num_attention_heads=4,
                                                    num_key_value_heads=2), seed=0)
    assert layer5.rope_theta == 5e5 and layer5.rope_scaling["rope_type"] == "llama3"
    # the same model in the transformers-4 spelling gives the same layer, output included
    layer4 = MultiHeadAttention.from_hf_config(dict(cfg, hidden_size=256,
                                                    num_attention_heads=4,
                                                    num_key_value_heads=2), seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 256)).astype(np.float32)
    np.testing.assert_array_equal(layer5(x), layer4(x))
    assert layer5._rope.get(3)[0].shape == layer4._rope.get(3)[0].shape


def test_from_hf_config_qwen2_qwen3_mistral_gemma2():
    qwen2 = MultiHeadAttention.from_hf_config({
        "model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14,
        "num_key_value_heads": 2, "rope_theta": 1e6, "sliding_window": 32768,
        "use_sliding_window": False, "rms_norm_eps": 1e-6}, seed=0)
    assert qwen2.qkv_bias and not qwen2.out_bias and qwen2.sliding_window is None
    assert qwen2.head_dim == 64
    qwen3 = MultiHeadAttention.from_hf_config({
        "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1e6,
        "attention_bias": False, "rms_norm_eps": 1e-6}, seed=0)
    assert qwen3.qk_norm and qwen3.head_dim == 128 and qwen3.q_norm.shape == (128,)
    assert qwen3.w_q.shape == (16 * 128, 1024)
    mistral = MultiHeadAttention.from_hf_config({
        "model_type": "mistral", "hidden_size": 256, "num_attention_heads": 8,
        "num_key_value_heads": 2, "sliding_window": 4096, "rope_theta": 1e4}, seed=0)
    assert mistral.sliding_window == 4096 and mistral.config.window == (4095, 0)
    g2 = {"model_type": "gemma2", "hidden_size": 256, "num_attention_heads": 8,
          "num_key_value_heads": 4, "head_dim": 64, "query_pre_attn_scalar": 144,
          "attn_logit_softcapping": 50.0, "sliding_window": 4096, "rope_theta": 1e4}
    local = MultiHeadAttention.from_hf_config(g2, layer_idx=0, seed=0)
    glob = MultiHeadAttention.from_hf_config(g2, layer_idx=1, seed=0)
    assert local.scale == pytest.approx(1 / 12) and local.softcap == 50.0
    assert local.sliding_window == 4096 and glob.sliding_window is None
    phi = MultiHeadAttention.from_hf_config({
        "model_type": "phi", "hidden_size": 256, "num_attention_heads": 8,
        "partial_rotary_factor": 0.5, "rope_theta": 1e4}, seed=0)
    assert phi.rotary_dim == 16 and phi.is_mha


def test_constructors_and_predicates():
    assert MultiHeadAttention.mha(64, 8).is_mha
    assert MultiHeadAttention.mqa(64, 8).is_mqa
    g = MultiHeadAttention.gqa(64, 8, 4)
    assert g.is_gqa and not g.is_mha and not g.is_mqa


# ---------------------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------------------
def _caches():
    why = numba_attn.available_backends().get("cuda", "no CUDA backend registered")
    return [pytest.param("contiguous", id="kvcache"), pytest.param("paged", id="paged"),
            pytest.param("cuda", id="kvcache-cuda", marks=pytest.mark.skipif(
                bool(why), reason=f"cuda backend unavailable: {why}"))]


def _make_cache(kind, layer, batch, n):
    if kind in ("contiguous", "cuda"):
        return numba_attn.KVCache(batch, n, layer.num_kv_heads, layer.head_dim,
                                  device="cpu" if kind == "contiguous" else "cuda")
    return numba_attn.PagedKVCache(batch, num_blocks=batch * (n // 4 + 1), block_size=4,
                                   num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim)


@pytest.mark.parametrize("kind", _caches())
@pytest.mark.parametrize("kw", [dict(rope_theta=1e4), dict(rope_theta=1e4, qk_norm=True,
                                                            sliding_window=4,
                                                            rotary_interleaved=True)],
                         ids=["rope", "qknorm-window-interleaved"])
def test_prefill_then_decode_equals_full_forward(rng, kind, kw):
    layer = MultiHeadAttention.gqa(64, 8, 2, qkv_bias=True, seed=17, **kw)
    randomise(layer, rng)
    x = rng.standard_normal((2, 9, 64)).astype(np.float32)
    full = layer(x)
    cache = _make_cache(kind, layer, 2, 16)
    parts = [layer(x[:, :5], cache=cache)]
    parts.append(layer(x[:, 5:7], cache=cache))  # a chunk of two
    for t in range(7, 9):
        parts.append(layer(x[:, t:t + 1], cache=cache))  # one-token decode steps
    got = np.concatenate(parts, axis=1)
    assert cache.seqlens.tolist() == [9, 9]
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-5)


def test_decode_with_explicit_positions(rng):
    layer = MultiHeadAttention.gqa(64, 4, 2, rope_theta=1e4, seed=18)
    x = rng.standard_normal((1, 6, 64)).astype(np.float32)
    full = layer(x, positions=np.arange(10, 16))
    cache = _make_cache("contiguous", layer, 1, 8)
    a = layer(x[:, :4], cache=cache, positions=np.arange(10, 14))
    b = layer(x[:, 4:], cache=cache, positions=np.arange(14, 16))
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, rtol=1e-4, atol=1e-5)


def _decode_peak(layer, n_cache, x):
    cache = numba_attn.KVCache(1, n_cache, layer.num_kv_heads, layer.head_dim)
    cache.seqlens = np.array([n_cache - 4])
    layer(x, cache=cache)  # warm-up: rotary table, compilation
    cache.seqlens = np.array([n_cache - 4])
    tracemalloc.start()
    layer(x, cache=cache)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_decode_allocations_do_not_grow_with_cache(rng):
    layer = MultiHeadAttention.gqa(64, 8, 2, rope_theta=1e4, seed=19)
    x = rng.standard_normal((1, 1, 64)).astype(np.float32)
    small = _decode_peak(layer, 512, x)
    big = _decode_peak(layer, 16384, x)
    # a gather or a score row over the cache would cost >= 16384 * 2 * 32 * 4 bytes
    assert big < small + 64 * 1024, (small, big)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, word", [
    (lambda l, x: l(x[..., :10]), AttentionError, "x"),
    (lambda l, x: l(x[0]), AttentionError, "x"),
    (lambda l, x: l(x.astype(np.int32)), TypeError, "x"),
    (lambda l, x: l(x, context=x[:1]), AttentionError, "context"),
    (lambda l, x: l(x, positions=np.arange(3)), AttentionError, "positions"),
    (lambda l, x: l(x, positions=np.arange(5.0)), TypeError, "positions"),
    (lambda l, x: l(x, lora={"z": (np.ones((1, 64)), np.ones((64, 1)))}), AttentionError,
     "lora"),
    (lambda l, x: l(x, lora={"q": (np.ones((2, 63)), np.ones((64, 2)))}), AttentionError,
     "lora"),
    (lambda l, x: l(x, lora={"q": (np.ones((2, 64)), np.ones((64, 3)))}), AttentionError,
     "lora"),
    (lambda l, x: l(x, kv_lens=np.array([1, 2, 3])), AttentionError, "kv_lens"),
], ids=["hidden", "rank", "dtype", "context-batch", "positions-shape", "positions-float",
        "lora-target", "lora-A", "lora-B", "kv_lens"])
def test_bad_input(rng, call, exc, word):
    layer = MultiHeadAttention.mha(64, 4, rope_theta=1e4, seed=20)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    with pytest.raises(exc, match=word):
        call(layer, x)


@pytest.mark.parametrize("kw, word", [
    (dict(hidden_size=64, num_heads=6), "head_dim"),
    (dict(hidden_size=64, num_heads=8, num_kv_heads=3), "num_kv_heads"),
    (dict(hidden_size=64, num_heads=4, rope_theta=1e4, partial_rotary_factor=0.01),
     "partial_rotary_factor"),
    (dict(hidden_size=64, num_heads=4, sliding_window=0), "sliding_window"),
    (dict(hidden_size=64, num_heads=4, softcap=-1.0), "softcap"),
    (dict(hidden_size=0, num_heads=4), "hidden_size"),
], ids=["indivisible", "kv-heads", "rotary-dim", "window", "softcap", "hidden"])
def test_bad_construction(kw, word):
    with pytest.raises(AttentionError, match=word):
        MultiHeadAttention(**kw)


def test_cache_misuse_leaves_cache_untouched(rng):
    layer = MultiHeadAttention.gqa(64, 4, 2, rope_theta=1e4, seed=21)
    cache = _make_cache("contiguous", layer, 2, 4)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    layer(x, cache=cache)
    with pytest.raises(AttentionError, match="overflow"):
        layer(x, cache=cache)
    with pytest.raises(AttentionError, match="kv_lens"):
        layer(x[:, :1], cache=cache, kv_lens=np.array([1, 1]))
    assert cache.seqlens.tolist() == [3, 3]


@pytest.mark.parametrize("tokens", [1, 3, 4, 5], ids=lambda t: f"tokens{t}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_projection_gemv_matches_float64_matmul(tokens, dtype):
    """Few-token projections (numba GEMV) and many-token ones (BLAS) both equal x @ w.T."""
    from numba_attn.layers import linear

    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((1, tokens, 96)).astype(dtype)
    w = rng.standard_normal((200, 96)).astype(dtype)
    b = rng.standard_normal(200).astype(dtype)
    got = linear(x, w, b)
    expected = x.astype(np.float64) @ w.astype(np.float64).T + b
    assert got.dtype == dtype and got.shape == (1, tokens, 200)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * 10)


def test_phi_config_matches_hugging_face_phi_attention(rng):
    """Phi-2's attention (biases on q/k/v and dense, partial rotary): from_hf_config +
    load_state_dict of HF's own module give HF's output (float64)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", minversion="5.0")  # rope_parameters API
    import warnings

    from transformers.models.phi import modeling_phi as mod

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.PhiConfig(hidden_size=64, num_attention_heads=4,
                                     partial_rotary_factor=0.5, rope_theta=1e4)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        hf = mod.PhiAttention(cfg, layer_idx=0).double()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.2)  # biases too: non-zero
        n = 6
        x = torch.from_numpy(rng.standard_normal((1, n, 64)))
        cos, sin = mod.PhiRotaryEmbedding(cfg)(x, torch.arange(n)[None])
        causal = torch.full((n, n), -torch.inf, dtype=torch.float64).triu(1)[None, None]
        with torch.no_grad():
            exp = hf(x, (cos.double(), sin.double()), causal)[0].numpy()
        ours = MultiHeadAttention.from_hf_config(cfg, dtype=np.float64)
        ours.load_state_dict(hf.state_dict())
    np.testing.assert_allclose(ours(x.numpy()), exp, rtol=1e-6, atol=1e-6)


HF_FAMILIES = {
    "llama3": ("llama", "Llama", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8, "rope_theta": 5e5})),
    "qwen2-bias": ("qwen2", "Qwen2", dict(num_key_value_heads=2)),
    "qwen3-qknorm": ("qwen3", "Qwen3", dict(num_key_value_heads=2, head_dim=32)),
    "mistral-window": ("mistral", "Mistral", dict(num_key_value_heads=1, sliding_window=3)),
    "gemma2-softcap": ("gemma2", "Gemma2", dict(num_key_value_heads=2, head_dim=16,
                                                query_pre_attn_scalar=24,
                                                attn_logit_softcapping=5.0,
                                                sliding_window=4)),
}


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_from_hf_config_matches_hugging_face_attention(rng, family):
    """Each family's HF attention module (float64, eager, its own weights with non-zero
    biases and norms) against from_hf_config(config object) + load_state_dict."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", minversion="5.0")  # rope_parameters API
    import importlib
    import warnings

    pkg, prefix, extra = HF_FAMILIES[family]
    mod = importlib.import_module(f"transformers.models.{pkg}.modeling_{pkg}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = getattr(transformers, f"{prefix}Config")(hidden_size=64, num_attention_heads=4,
                                                       **extra)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        hf = getattr(mod, f"{prefix}Attention")(cfg, layer_idx=0).double()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name
                        else 0.2 * torch.randn_like(p))
        n = 7
        x = torch.from_numpy(rng.standard_normal((1, n, 64)))
        cos, sin = getattr(mod, f"{prefix}RotaryEmbedding")(cfg)(x, torch.arange(n)[None])
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        visible = j <= i
        window = extra.get("sliding_window")
        if window:
            visible &= j > i - window  # HF: a token sees itself and window - 1 before it
        mask = torch.from_numpy(np.where(visible, 0.0, -np.inf))[None, None]
        with torch.no_grad():
            exp = hf(x, position_embeddings=(cos.double(), sin.double()),
                     attention_mask=mask)[0].numpy()
        ours = MultiHeadAttention.from_hf_config(cfg, layer_idx=0, dtype=np.float64)
        ours.load_state_dict(hf.state_dict())
    np.testing.assert_allclose(ours(x.numpy()), exp, rtol=1e-6, atol=1e-6)
