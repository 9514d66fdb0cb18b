"""yarn, longrope and dynamic rope scaling: rotary_cos_sin and the layers against the
formulas written out in numerics.py and, where transformers is installed, against
Hugging Face's own rotary modules (float32 there, so within its rounding)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from numerics import expected_rope

import numba_attn as na
from numba_attn import MultiHeadAttention, reference
from numba_attn import reference_rope as rr
from numba_attn.layers import RotaryTable

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
YARN_DS = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
           "truncate": False}
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 32,
            "max_position_embeddings": 128,
            "long_factor": [1.0, 1.2, 1.7, 2.5, 4.0, 6.5, 9.0, 12.0],
            "short_factor": [1.0, 1.0, 1.1, 1.1, 1.2, 1.3, 1.4, 1.5]}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 32}
CASES = {"yarn": YARN, "yarn-deepseek": YARN_DS, "longrope": LONGROPE, "dynamic": DYNAMIC}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("max_position", [16, 100])
def test_rotary_cos_sin_matches_the_formulas(name, max_position):
    sc = CASES[name]
    cos, sin = na.rotary_cos_sin(max_position, 16, base=10000.0, scaling=sc,
                                 dtype=np.float64)
    inv, att = expected_rope(16, 10000.0, sc, max_position)
    ang = np.arange(max_position)[:, None] * inv[None, :]
    np.testing.assert_allclose(cos, np.cos(ang) * att, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sin, np.sin(ang) * att, rtol=1e-12, atol=1e-12)


def test_longrope_and_dynamic_depend_on_the_length_served():
    short = na.rotary_cos_sin(16, 16, scaling=LONGROPE, dtype=np.float64)[0]
    long_ = na.rotary_cos_sin(16, 16, scaling=LONGROPE, dtype=np.float64, seq_len=100)[0]
    assert not np.allclose(short, long_)
    inv, att = expected_rope(16, 10000.0, LONGROPE, 100)
    np.testing.assert_allclose(long_, np.cos(np.arange(16)[:, None] * inv) * att, rtol=1e-12)
    d16 = na.rotary_cos_sin(16, 16, scaling=DYNAMIC, dtype=np.float64)[0]
    plain = na.rotary_cos_sin(16, 16, dtype=np.float64)[0]
    np.testing.assert_allclose(d16, plain, rtol=1e-12)  # within the original length


@pytest.mark.parametrize("bad, text", [
    (dict(YARN, factor="x"), "factor"),
    ({"rope_type": "yarn", "factor": 2.0}, "original_max_position_embeddings"),
    (dict(LONGROPE, long_factor=[1.0] * 3), "long_factor"),
    ({"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings"),
    (dict(YARN, beta_fast=-1), "beta_fast"),
])
def test_bad_scaling_names_the_key(bad, text):
    with pytest.raises((TypeError, na.AttentionError), match=text):
        na.rotary_cos_sin(16, 16, scaling=bad)
    with pytest.raises((TypeError, na.AttentionError), match=text):
        MultiHeadAttention(64, 4, rope_theta=1e4, rope_scaling=bad)


@pytest.mark.parametrize("name", list(CASES))
def test_layer_forward_with_scaling_matches_the_oracle(rng, name):
    sc = CASES[name]
    layer = MultiHeadAttention(64, 4, 2, rope_theta=1e4, rope_scaling=sc, seed=0,
                               dtype=np.float64)
    x = rng.standard_normal((1, 40, 64))  # longer than the original 32 positions
    got = layer(x)
    inv, att = expected_rope(16, 1e4, sc, 40)
    ang = np.arange(40)[:, None] * inv
    cos, sin = np.cos(ang) * att, np.sin(ang) * att
    q = (x @ layer.w_q.T).reshape(40, 4, 16)
    k = (x @ layer.w_k.T).reshape(40, 2, 16)
    v = (x @ layer.w_v.T).reshape(1, 40, 2, 16)
    qr = rr.apply_rotary(q, cos, sin, np.arange(40))[None]
    kr = rr.apply_rotary(k, cos, sin, np.arange(40))[None]
    o = reference.attention(qr, kr, v, causal=True).reshape(1, 40, 64)
    np.testing.assert_allclose(got, o @ layer.w_o.T, rtol=1e-9, atol=1e-9)


def test_layer_dynamic_follows_hf_per_call_rule():
    """Grows with the longest length seen, returns to the original below it."""
    table = RotaryTable(16, 1e4, DYNAMIC, np.float64)
    for n, served in [(10, 32), (50, 50), (40, 50), (60, 60), (20, 32)]:
        cos = table.get(n)[0]
        inv, _ = expected_rope(16, 1e4, DYNAMIC, served)
        np.testing.assert_allclose(cos[:n], np.cos(np.arange(n)[:, None] * inv), rtol=1e-12,
                                   atol=1e-12, err_msg=f"n={n}")


def test_from_hf_config_phi3_longrope_and_qwen_yarn():
    phi3 = MultiHeadAttention.from_hf_config({
        "model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4,
        "max_position_embeddings": 128, "original_max_position_embeddings": 32,
        "rope_theta": 1e4, "rope_scaling": {k: v for k, v in LONGROPE.items()
                                            if k not in ("original_max_position_embeddings",
                                                         "max_position_embeddings")}})
    assert phi3.rope_scaling["original_max_position_embeddings"] == 32
    assert phi3.rope_scaling["max_position_embeddings"] == 128
    qwen = MultiHeadAttention.from_hf_config({
        "model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
        "head_dim": 16, "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                            "original_max_position_embeddings": 32}})
    assert qwen.rope_scaling["rope_type"] == "yarn" and qwen.rope_theta == 1e6
    y = qwen(np.ones((1, 3, 64), np.float32))
    assert y.shape == (1, 3, 64)


# -- Hugging Face itself -----------------------------------------------------------------
def _hf_cos(emb_cls, config, positions):
    import torch

    emb = emb_cls(config)
    x = torch.zeros(1, len(positions), 16)
    cos, sin = emb(x, torch.as_tensor(positions)[None])
    return cos[0, :, :8].double().numpy(), sin[0, :, :8].double().numpy()


@pytest.mark.parametrize("name", ["yarn", "yarn-deepseek", "dynamic", "longrope"])
def test_tables_match_hugging_face(name):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", minversion="5.0")  # rope_parameters API
    sc = dict(CASES[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "longrope":
            from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding as Emb

            params = {k: v for k, v in sc.items() if k not in (
                "original_max_position_embeddings", "max_position_embeddings")}
            cfg = transformers.Phi3Config(hidden_size=64, num_attention_heads=4,
                                          max_position_embeddings=128,
                                          original_max_position_embeddings=32,
                                          rope_parameters=dict(params, rope_theta=1e4))
        else:
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Emb

            mpe = sc.pop("max_position_embeddings", 128)
            cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                           max_position_embeddings=mpe,
                                           rope_parameters=dict(sc, rope_theta=1e4))
        ours = MultiHeadAttention.from_hf_config(dict(cfg.to_dict(), model_type=(
            "phi3" if name == "longrope" else "llama")), dtype=np.float64)
        for n in (20, 60):  # below and above the original length
            hc, hs = _hf_cos(Emb, cfg, np.arange(n))
            cos, sin = ours._rope.get(n)
            np.testing.assert_allclose(cos[:n], hc, atol=3e-5, err_msg=f"{name} n={n}")
            np.testing.assert_allclose(sin[:n], hs, atol=3e-5, err_msg=f"{name} n={n}")


@pytest.mark.parametrize("name", ["yarn", "dynamic", "longrope"])
def test_layer_matches_hugging_face_attention(rng, name):
    """from_hf_config + load_state_dict of HF's own attention module, float64 weights and
    activations: the same output (HF's rotary tables are float32, hence the tolerance)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", minversion="5.0")  # rope_parameters API
    sc = dict(CASES[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "longrope":
            from transformers.models.phi3 import modeling_phi3 as mod

            params = {k: v for k, v in sc.items() if k not in (
                "original_max_position_embeddings", "max_position_embeddings")}
            cfg = transformers.Phi3Config(
                hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, original_max_position_embeddings=32,
                rope_parameters=dict(params, rope_theta=1e4))
            attn_cls, emb_cls = mod.Phi3Attention, mod.Phi3RotaryEmbedding
        else:
            from transformers.models.llama import modeling_llama as mod

            mpe = sc.pop("max_position_embeddings", 128)
            cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                           num_key_value_heads=2, max_position_embeddings=mpe,
                                           rope_parameters=dict(sc, rope_theta=1e4))
            attn_cls, emb_cls = mod.LlamaAttention, mod.LlamaRotaryEmbedding
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        hf = attn_cls(cfg, layer_idx=0).double()
        emb = emb_cls(cfg)
        n = 40  # past the original 32 positions
        x = torch.from_numpy(rng.standard_normal((1, n, 64)))
        cos, sin = emb(x, torch.arange(n)[None])
        causal = torch.full((n, n), -torch.inf, dtype=torch.float64).triu(1)[None, None]
        with torch.no_grad():
            exp = hf(x, position_embeddings=(cos.double(), sin.double()),
                     attention_mask=causal)[0].numpy()
        ours = MultiHeadAttention.from_hf_config(cfg, dtype=np.float64)
        ours.load_state_dict({k: v.detach() for k, v in hf.state_dict().items()})
        got = ours(x.numpy())
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)


def test_mla_yarn_tables_match_hugging_face_deepseek_v3():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", minversion="5.0")  # rope_parameters API
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod

    sc = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.DeepseekV3Config(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
            q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8,
            max_position_embeddings=2560, rope_parameters=dict(sc, rope_theta=1e4))
        emb = mod.DeepseekV3RotaryEmbedding(cfg)
        ours = na.MultiHeadLatentAttention.from_hf_config(cfg, dtype=np.float64)
        hc, hs = _hf_cos(emb_cls=lambda c: emb, config=cfg, positions=np.arange(50))
    cos, sin = ours._rope.get(50)
    np.testing.assert_allclose(cos[:50], hc, atol=3e-5)
    np.testing.assert_allclose(sin[:50], hs, atol=3e-5)


def test_old_key_names():
    """``type`` for ``rope_type`` and Phi-3's early ``su`` for ``longrope``."""
    old = {k: v for k, v in LONGROPE.items() if k != "rope_type"}
    got = na.rotary_cos_sin(40, 16, scaling=dict(old, type="su"), dtype=np.float64)
    exp = na.rotary_cos_sin(40, 16, scaling=LONGROPE, dtype=np.float64)
    np.testing.assert_array_equal(got[0], exp[0])
