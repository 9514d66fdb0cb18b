"""Hostile inputs (issue 10): the right exception type, the argument named in the message,
and nothing changed — caches, ``out`` and layers stay exactly as they were."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn as na
from numba_attn import AttentionError, BackendUnavailable, MultiHeadAttention

F32 = np.float32


def qkv(rng, b=2, sq=3, sk=5, h=4, hkv=2, d=8):
    return (rng.standard_normal((b, sq, h, d)).astype(F32),
            rng.standard_normal((b, sk, hkv, d)).astype(F32),
            rng.standard_normal((b, sk, hkv, d)).astype(F32))


def cache_state(cache):
    return cache.k.copy(), cache.v.copy(), cache.seqlens.copy()


def assert_cache_unchanged(cache, state):
    for got, exp in zip(cache_state(cache), state):
        np.testing.assert_array_equal(got, exp)


def layer_state(layer):
    return {k: v.copy() for k, v in layer.state_dict().items()}


def assert_layer_unchanged(layer, state):
    now = layer.state_dict()
    assert now.keys() == state.keys()
    for k in now:
        np.testing.assert_array_equal(now[k], state[k])


# ---------------------------------------------------------------------------------------
# 1. failed calls change nothing
# ---------------------------------------------------------------------------------------
def test_huge_window_in_kvcache_call_is_unbounded_not_an_overflow(rng):
    """2**64 fits no kernel integer; a side that wide sees every key: it means -1."""
    q, k, v = qkv(rng, sq=1, sk=1)
    cache = na.KVCache(2, 16, num_kv_heads=2, head_dim=8)
    cache.append(*qkv(rng, sk=5)[1:])
    twin = na.KVCache(2, 16, num_kv_heads=2, head_dim=8)
    twin.append(cache.k[:, :5].copy(), cache.v[:, :5].copy())
    got = na.attention_with_kvcache(q, cache, k, v, window=(2**64, 0), causal=True)
    exp = na.attention_with_kvcache(q, twin, k, v, window=(-1, 0), causal=True)
    np.testing.assert_array_equal(got, exp)
    assert cache.seqlens.tolist() == [6, 6]
    assert na.AttentionConfig(4, head_dim=8, window=(2**64, 3)).window == (-1, 3)


@pytest.mark.parametrize("window, exc", [((1.5, 2.0), AttentionError),
                                         ("12", AttentionError),
                                         ((2**64, "x"), AttentionError),
                                         ((True, 0), AttentionError)])
def test_bad_window_in_kvcache_call_leaves_cache_unchanged(rng, window, exc):
    q, k, v = qkv(rng, sq=1, sk=1)
    cache = na.KVCache(2, 16, num_kv_heads=2, head_dim=8)
    cache.append(*qkv(rng, sk=5)[1:])
    state = cache_state(cache)
    with pytest.raises(exc, match="window"):
        na.attention_with_kvcache(q, cache, k, v, window=window)
    assert_cache_unchanged(cache, state)


def test_layer_with_huge_sliding_window_and_cache(rng):
    layer = MultiHeadAttention(32, 4, 2, sliding_window=2**64, rope_theta=1e4, seed=0)
    ref = MultiHeadAttention(32, 4, 2, rope_theta=1e4, seed=0)
    x = rng.standard_normal((1, 4, 32)).astype(F32)
    c1 = na.KVCache(1, 8, num_kv_heads=2, head_dim=8)
    c2 = na.KVCache(1, 8, num_kv_heads=2, head_dim=8)
    np.testing.assert_array_equal(layer(x, cache=c1), ref(x, cache=c2))
    assert layer.config.window == (-1, 0)


def test_load_state_dict_is_atomic_when_the_last_entry_cannot_convert(rng):
    layer = MultiHeadAttention(16, 2, seed=0)
    state = layer_state(layer)
    params = {k: np.zeros_like(v) for k, v in state.items()}
    params["o_proj.weight"] = np.full(params["o_proj.weight"].shape, "x")
    with pytest.raises(AttentionError, match="o_proj.weight") as info:
        layer.load_state_dict(params)
    assert "nothing loaded" in str(info.value)
    assert_layer_unchanged(layer, state)


@pytest.mark.parametrize("bad", ["complex", "object-none", "inf-after-cast"])
def test_load_state_dict_rejects_values_that_are_not_real_weights(bad):
    layer = MultiHeadAttention(16, 2, qkv_bias=True, seed=0)
    state = layer_state(layer)
    params = dict(state)
    shape = params["q_proj.bias"].shape
    params["q_proj.bias"] = {"complex": np.ones(shape, np.complex64),
                             "object-none": np.full(shape, None, dtype=object),
                             "inf-after-cast": np.full(shape, 1e300)}[bad]
    with pytest.raises(AttentionError, match="q_proj.bias"):
        layer.load_state_dict(params)
    assert_layer_unchanged(layer, state)


def test_load_state_dict_takes_pairs_and_rejects_non_mappings():
    layer = MultiHeadAttention(16, 2, seed=0)
    pairs = [(k, v + 1) for k, v in layer.state_dict().items()]
    layer.load_state_dict(pairs)
    np.testing.assert_array_equal(layer.w_q, pairs[0][1])
    with pytest.raises(TypeError, match="params"):
        layer.load_state_dict(42)


# ---------------------------------------------------------------------------------------
# 2. the right exception type, the argument named
# ---------------------------------------------------------------------------------------
def test_wrong_types_for_attention(rng):
    q, k, v = qkv(rng)
    cases = [
        (dict(mask=[[True, False]] * 3), AttentionError, "mask"),  # nested list, wrong shape
        (dict(mask=[[1, 0], [1]]), TypeError, "mask"),  # ragged
        (dict(bias=np.full((3, 5), "a")), TypeError, "bias"),
        (dict(bias=np.ones((3, 5), np.complex128)), TypeError, "bias"),
        (dict(bias=np.full((3, 5), None, dtype=object)), TypeError, "bias"),
        (dict(alibi_slopes=np.ones(4, np.complex64)), TypeError, "alibi_slopes"),
        (dict(sinks=np.array(["a"] * 4)), TypeError, "sinks"),
        (dict(scale="abc"), TypeError, "scale"),
        (dict(scale=1e39), AttentionError, "scale"),  # inf in float32
        (dict(scale=1e-50), AttentionError, "scale"),  # 0 in float32
        (dict(softcap=1e39), AttentionError, "softcap"),
        (dict(softcap="x"), TypeError, "softcap"),
        (dict(window=(1.5, 2.0)), AttentionError, "window"),
        (dict(window="12"), AttentionError, "window"),
        (dict(causal="maybe"), AttentionError, "causal"),
    ]
    out = np.full((2, 3, 4, 8), 7.0, F32)
    for kw, exc, text in cases:
        with pytest.raises(exc, match=text):
            na.attention(q, k, v, out=out, **kw)
        np.testing.assert_array_equal(out, 7.0)
    mask = [[True] * 5] * 3  # a nested list of the right shape is a mask
    np.testing.assert_array_equal(na.attention(q, k, v, mask=mask), na.attention(q, k, v))


def test_wrong_types_for_varlen_and_rope():
    x = np.zeros((4, 2, 8), F32)
    cu = np.array([0, 4], np.int32)
    with pytest.raises(TypeError, match="max_seqlen_q"):
        na.attention_varlen(x, x, x, cu, cu, max_seqlen_q="abc")
    with pytest.raises(TypeError, match="base"):
        na.rotary_cos_sin(16, 8, base="abc")
    with pytest.raises(TypeError, match="factor"):
        na.rotary_cos_sin(16, 8, scaling={"rope_type": "linear", "factor": "x"})
    cos, sin = na.rotary_cos_sin(16, 8)
    with pytest.raises(TypeError, match="positions"):
        na.apply_rotary(np.zeros((1, 2, 1, 8), F32), cos, sin, positions=np.array(1.5))
    with pytest.raises(TypeError, match="positions"):
        na.apply_rotary(np.zeros((1, 2, 1, 8), F32), cos, sin, positions=1.0)


def test_rms_norm_out_errors(rng):
    x = rng.standard_normal((2, 8)).astype(F32)
    out = np.zeros((2, 8), F32)
    out.setflags(write=False)
    with pytest.raises(AttentionError, match="out"):
        na.rms_norm(x, np.ones(8, F32), out=out)
    out16 = np.zeros((2, 8), np.float16)
    out16.setflags(write=False)
    with pytest.raises(AttentionError, match="out"):
        na.rms_norm(x.astype(np.float16), np.ones(8, np.float16), out=out16)
    with pytest.raises(TypeError, match="eps"):
        na.rms_norm(x, np.ones(8, F32), eps="small")


def test_layer_constructor_names_bad_values():
    cases = [
        (dict(sliding_window="abc"), TypeError, "sliding_window"),
        (dict(rope_theta="big"), TypeError, "rope_theta"),
        (dict(num_heads="eight"), TypeError, "num_heads"),
        (dict(rope_theta=1e4, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
         AttentionError, "original_max_position_embeddings"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), AttentionError,
         "rope_theta"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(norm_eps="tiny"), TypeError, "norm_eps"),
    ]
    for kw, exc, text in cases:
        args = dict(hidden_size=32, num_heads=4)
        args.update(kw)
        with pytest.raises(exc, match=text):
            MultiHeadAttention(args.pop("hidden_size"), args.pop("num_heads"), **args)


def test_layer_huge_positions_no_memory_error(rng):
    """Positions near 2**40 rotate with angles computed at those positions (no table)."""
    layer = MultiHeadAttention(16, 2, rope_theta=1e4, seed=0)
    x = rng.standard_normal((1, 2, 16)).astype(F32)
    pos = np.array([2**40, 2**40 + 1])
    got = layer(x, positions=pos)
    exp_layer = MultiHeadAttention(16, 2, rope_theta=1e4, seed=0)
    q = (x @ exp_layer.w_q.T).reshape(1, 2, 2, 8)
    k = (x @ exp_layer.w_k.T).reshape(1, 2, 2, 8)
    vv = (x @ exp_layer.w_v.T).reshape(1, 2, 2, 8)
    from numba_attn import reference_rope as rr

    freq = rr.inv_freq(8)
    ang = np.outer(pos.astype(np.float64), freq)
    cos, sin = np.cos(ang), np.sin(ang)
    qr = rr.apply_rotary(q[0], cos, sin, np.arange(2))[None]
    kr = rr.apply_rotary(k[0], cos, sin, np.arange(2))[None]
    from numba_attn import reference

    o = reference.attention(qr, kr, vv, causal=True).reshape(1, 2, 16)
    np.testing.assert_allclose(got, o @ exp_layer.w_o.T, atol=1e-4)


def test_layer_backend_cuda_without_gpu_is_backend_unavailable(rng):
    why = na.available_backends().get("cuda")
    if why is None:
        pytest.skip("a CUDA backend is available here")
    layer = MultiHeadAttention(16, 2, seed=0, backend="cuda")
    x = rng.standard_normal((1, 2, 16)).astype(F32)
    with pytest.raises(BackendUnavailable, match="cuda"):
        layer(x)
    cache = na.KVCache(1, 8, num_kv_heads=2, head_dim=8)
    with pytest.raises(BackendUnavailable, match="cuda"):
        layer(x, cache=cache)
    assert cache.seqlens.tolist() == [0]


def test_from_hf_config_errors():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    cases = [
        (None, TypeError, "config"),
        ({"model_type": "llama", "hidden_size": 64}, AttentionError, "num_attention_heads"),
        (dict(base, num_attention_heads="eight"), TypeError, "num_attention_heads"),
        (dict(base, num_key_value_heads=0), AttentionError, "num_key_value_heads"),
        (dict(base, rope_theta="big"), TypeError, "rope_theta"),
        (dict(base, sliding_window="abc"), TypeError, "sliding_window"),
        (dict(base, model_type="gpt2"), AttentionError, "gpt2"),
        (dict(base, model_type="deepseek_v3", kv_lora_rank=16), AttentionError,
         "MultiHeadLatentAttention"),
        (dict(base, model_type="t5"), AttentionError, "t5"),
        (dict(base, model_type="phi", qk_layernorm=True), AttentionError, "phi"),
        (dict(base, model_type="bert", position_embedding_type="relative_key"),
         AttentionError, "bert"),
    ]
    for cfg, exc, text in cases:
        with pytest.raises(exc, match=text):
            MultiHeadAttention.from_hf_config(cfg)
    with pytest.raises(AttentionError, match="kv_lora_rank"):
        na.MultiHeadLatentAttention.from_hf_config(base)


def test_from_hf_config_maps_phi_and_bert_faithfully_and_reads_objects():
    phi = MultiHeadAttention.from_hf_config({
        "model_type": "phi", "hidden_size": 64, "num_attention_heads": 4,
        "partial_rotary_factor": 0.5, "rope_theta": 1e4})
    assert phi.qkv_bias and phi.out_bias and phi.rotary_dim == 8 and phi.causal
    sd = phi.state_dict()
    sd["dense.weight"] = sd.pop("o_proj.weight") + 1
    sd["dense.bias"] = sd.pop("o_proj.bias")
    phi.load_state_dict(sd)
    np.testing.assert_array_equal(phi.w_o, sd["dense.weight"])
    bert = MultiHeadAttention.from_hf_config({
        "model_type": "bert", "hidden_size": 64, "num_attention_heads": 4,
        "layer_norm_eps": 1e-12})
    assert not bert.causal and bert.rope_theta is None and bert.qkv_bias and bert.out_bias

    class Config:  # anything with to_dict(), as transformers' PretrainedConfig
        def to_dict(self):
            return {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "rope_theta": 1e6}

    q2 = MultiHeadAttention.from_hf_config(Config())
    assert q2.num_kv_heads == 2 and q2.qkv_bias and q2.rope_theta == 1e6


# ---------------------------------------------------------------------------------------
# 3. torch CPU tensors everywhere: torch in, torch out
# ---------------------------------------------------------------------------------------
def test_torch_tensors_everywhere(rng):
    torch = pytest.importorskip("torch")
    q, k, v = qkv(rng, sq=1, sk=1)
    tq = torch.from_numpy(q).requires_grad_(True)
    tk, tv = torch.from_numpy(k), torch.from_numpy(v)
    got = na.attention(tq, tk, tv)
    assert isinstance(got, torch.Tensor) and got.grad_fn is not None  # autograd flows
    np.testing.assert_array_equal(got.detach().numpy(), na.attention(q, k, v))
    cache = na.KVCache(2, 8, num_kv_heads=2, head_dim=8)
    twin = na.KVCache(2, 8, num_kv_heads=2, head_dim=8)
    o = na.attention_with_kvcache(tq, cache, tk, tv, causal=True)
    assert isinstance(o, torch.Tensor)
    np.testing.assert_array_equal(o.numpy(), na.attention_with_kvcache(q, twin, k, v,
                                                                       causal=True))
    cache.append(tk, tv)
    assert cache.seqlens.tolist() == [2, 2]
    cos, sin = na.rotary_cos_sin(8, 8)
    r = na.apply_rotary(tq, torch.from_numpy(cos), torch.from_numpy(sin))
    assert isinstance(r, torch.Tensor)
    np.testing.assert_array_equal(r.numpy(), na.apply_rotary(q, cos, sin))
    w = torch.ones(8)
    n = na.rms_norm(tq, w)
    assert isinstance(n, torch.Tensor)
    np.testing.assert_array_equal(n.numpy(), na.rms_norm(q, np.ones(8, F32)))
    layer = MultiHeadAttention(32, 4, 2, rope_theta=1e4, seed=0)
    x = rng.standard_normal((1, 3, 32)).astype(F32)
    y = layer(torch.from_numpy(x).requires_grad_(True))
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), layer(x))
    layer.load_state_dict({kk: torch.from_numpy(vv).requires_grad_(True)
                           for kk, vv in layer.state_dict().items()})
    oa, la = na.attention(tq, tk, tv, return_lse=True)
    mo, ml = na.merge_states(oa, la, oa, la)
    assert isinstance(mo, torch.Tensor) and isinstance(ml, torch.Tensor)
    np.testing.assert_allclose(mo.detach().numpy(), oa.detach().numpy(), atol=1e-6)


def test_torch_bfloat16_is_a_zero_copy_view(rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    q, k, v = qkv(rng)
    tq, tk, tv = (torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v))
    got = na.attention(tq, tk, tv, causal=True)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
    from numba_attn.interop import to_numpy

    view = to_numpy("q", tq)
    assert view.ctypes.data == tq.data_ptr()
    exp = na.attention(view, to_numpy("k", tk), to_numpy("v", tv), causal=True)
    np.testing.assert_array_equal(got.float().numpy(), exp.astype(F32))


def test_torch_out_is_written_in_place(rng):
    torch = pytest.importorskip("torch")
    q, k, v = qkv(rng)
    out = torch.zeros(2, 3, 4, 8)
    res = na.attention(q, k, v, out=out)
    assert res is out
    np.testing.assert_array_equal(out.numpy(), na.attention(q, k, v))


def test_flags_must_be_bools(rng):
    q, k, v = qkv(rng)
    with pytest.raises(TypeError, match="return_lse"):
        na.attention(q, k, v, return_lse="yes")
    cos, sin = na.rotary_cos_sin(8, 8)
    with pytest.raises(TypeError, match="interleaved"):
        na.apply_rotary(q, cos, sin, interleaved="no")
    cache = na.KVCache(2, 8, num_kv_heads=2, head_dim=8)
    with pytest.raises(TypeError, match="rotary_interleaved"):
        na.attention_with_kvcache(q, cache, k[:, :1], v[:, :1], rotary_cos=cos,
                                  rotary_sin=sin, rotary_interleaved="no")
    assert cache.seqlens.tolist() == [0, 0]


def test_bfloat16_without_ml_dtypes_says_what_to_install(monkeypatch):
    torch = pytest.importorskip("torch")
    from numba_attn import validate

    monkeypatch.setattr(validate, "_bfloat16", lambda: None)
    t = torch.zeros(1, 2, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q: bfloat16 needs ml_dtypes"):
        na.attention(t, t, t)


@pytest.mark.parametrize("kw, exc, text", [
    (dict(mask=np.ones((1, 1, 3, 99), bool)), AttentionError, "mask"),
    (dict(mask=[[1, 0], [1]]), TypeError, "mask"),
    (dict(positions=np.array([0.5, 1.5, 2.5])), TypeError, "positions"),
    (dict(lora={"q": "x"}), TypeError, "lora"),
    (dict(lora_scale="big"), TypeError, "lora_scale"),
    (dict(backend="tpu"), AttentionError, "backend"),
])
def test_failed_layer_call_leaves_cache_and_layer_unchanged(rng, kw, exc, text):
    layer = MultiHeadAttention(32, 4, 2, rope_theta=1e4, seed=0)
    cache = na.KVCache(1, 8, num_kv_heads=2, head_dim=8)
    layer(rng.standard_normal((1, 2, 32)).astype(F32), cache=cache)
    state, lstate = cache_state(cache), layer_state(layer)
    with pytest.raises(exc, match=text):
        layer(rng.standard_normal((1, 3, 32)).astype(F32), cache=cache, **kw)
    assert_cache_unchanged(cache, state)
    assert_layer_unchanged(layer, lstate)
