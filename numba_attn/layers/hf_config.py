"""Hugging Face ``config.json`` -> the layers' constructor arguments: checked reads of
the keys, the rope parameters (old and new key layouts), the model types each layer
represents faithfully and why the others are refused.
"""
from __future__ import annotations

from ..config import AttentionError, check_flag, check_int, check_real

__all__ = ["hf_dict", "hf_get", "hf_rope", "mha_args", "mla_args"]


def hf_dict(config):
    """A plain dict of a Hugging Face config: a ``config.json`` dict, or any object with
    ``to_dict()`` (``transformers.PretrainedConfig``)."""
    if hasattr(config, "to_dict") and callable(config.to_dict):
        config = config.to_dict()
    if not hasattr(config, "keys") or isinstance(config, (str, bytes)):
        raise TypeError(f"config: expected a config.json dict or an object with to_dict() "
                        f"(transformers.PretrainedConfig), got {type(config).__name__}")
    return dict(config)


_REQUIRED = object()


def hf_get(c, key, kind, default=_REQUIRED, lo=None):
    """``c[key]`` checked as ``kind`` ("int", "real", "flag"); errors name the key."""
    val = c.get(key)
    if val is None:
        if default is _REQUIRED:
            raise AttentionError(f"config: missing key {key!r} (model_type "
                                 f"{c.get('model_type')!r})")
        return default
    name = f"config[{key!r}]"
    if kind == "int":
        return check_int(name, val, lo=lo)
    if kind == "flag":
        return check_flag(name, val)
    v = check_real(name, val)
    if lo is not None and v < lo:
        raise AttentionError(f"{name}: must be >= {lo}, got {val!r}")
    return v


def hf_rope(config):
    """(rope_theta, rope_scaling) from a Hugging Face config (old or new key layout).

    The lengths Hugging Face reads from the config itself are copied into the scaling
    dict: ``original_max_position_embeddings`` (llama3, yarn, longrope; a top-level value
    wins, as for Phi-3) and ``max_position_embeddings`` (dynamic, yarn, longrope).
    """
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise TypeError(f"config['rope_parameters']: expected a dict, got {params!r}")
    theta = config.get("rope_theta")
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    theta = check_real("config['rope_theta']", theta)
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", params.get(
        "type")) not in (None, "default") else None)
    if scaling is not None and not isinstance(scaling, dict):
        raise TypeError(f"config['rope_scaling']: expected a dict, got {scaling!r}")
    if not scaling or scaling.get("rope_type", scaling.get("type")) in ("default", None):
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta",
                                                             "partial_rotary_factor")}
    kind = scaling.get("rope_type", scaling.get("type"))
    top_orig = config.get("original_max_position_embeddings")
    mpe = config.get("max_position_embeddings")
    if kind in ("llama3", "yarn", "longrope"):
        if top_orig is not None:
            scaling["original_max_position_embeddings"] = top_orig
        elif mpe is not None:
            scaling.setdefault("original_max_position_embeddings", mpe)
    if kind in ("dynamic", "yarn", "longrope") and mpe is not None:
        scaling.setdefault("max_position_embeddings", mpe)
    return theta, scaling


# model types whose attention MultiHeadAttention computes exactly (rope, biases, norms)
_HF_LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                  "gemma", "gemma2", "phi", "phi3", "bert", "roberta", "xlm-roberta")
_HF_OTHER = {
    "deepseek_v2": "multi-head latent attention: use "
                   "MultiHeadLatentAttention.from_hf_config",
    "deepseek_v3": "multi-head latent attention: use "
                   "MultiHeadLatentAttention.from_hf_config",
    "gpt2": "Conv1D weights stored (in, out) under c_attn/c_proj and n_embd/n_head keys: "
            "build MultiHeadAttention(n_embd, n_head, qkv_bias=True, out_bias=True) and "
            "load c_attn.weight.T as qkv_proj.weight, c_proj.weight.T as o_proj.weight",
    "gemma3_text": "(1 + w) RMSNorm on q/k and per-layer local rope bases: not represented",
    "gemma3": "(1 + w) RMSNorm on q/k and per-layer local rope bases: not represented",
}


def mha_args(config, layer_idx):
    """(hidden_size, num_heads, the other constructor arguments) of
    :meth:`MultiHeadAttention.from_hf_config <numba_attn.MultiHeadAttention.from_hf_config>`."""
    c = hf_dict(config)
    mt = str(c.get("model_type") or "")
    if mt in _HF_OTHER or (c.get("kv_lora_rank") is not None and not mt):
        why = _HF_OTHER.get(mt, _HF_OTHER["deepseek_v3"])
        raise AttentionError(f"config: model_type {mt!r} is not a MultiHeadAttention "
                             f"model ({why})")
    if mt and mt not in _HF_LLAMA_LIKE:
        raise AttentionError(
            f"config: model_type {mt!r} is not one MultiHeadAttention is known to "
            f"represent faithfully (known: {', '.join(_HF_LLAMA_LIKE)}); build "
            f"MultiHeadAttention(...) with its arguments directly")
    bert = mt in ("bert", "roberta", "xlm-roberta")
    if bert and c.get("position_embedding_type", "absolute") != "absolute":
        raise AttentionError(f"config: model_type {mt!r} with position_embedding_type "
                             f"{c['position_embedding_type']!r} (relative position "
                             f"scores) is not represented")
    if mt == "phi" and c.get("qk_layernorm"):
        raise AttentionError("config: model_type 'phi' with qk_layernorm (LayerNorm, "
                             "not RMSNorm, on q and k) is not represented")
    h = hf_get(c, "num_attention_heads", "int", lo=1)
    hidden = hf_get(c, "hidden_size", "int", lo=1)
    bias = hf_get(c, "attention_bias", "flag", False)
    qkv_bias = bias or mt == "qwen2" or mt.startswith("qwen2_") or mt == "phi" or bert
    out_bias = bias or mt == "phi" or bert
    if bert:
        theta, scaling = None, None  # absolute positions: added before the layer
    else:
        theta, scaling = hf_rope(c)
    window = hf_get(c, "sliding_window", "int", None, lo=1)
    if c.get("use_sliding_window") is False:
        window = None
    layer_idx = check_int("layer_idx", layer_idx, lo=0)
    layer_types = c.get("layer_types")
    if layer_types is not None and layer_idx < len(layer_types):
        if layer_types[layer_idx] != "sliding_attention":
            window = None
    elif mt == "gemma2" and layer_idx % 2:
        window = None
    scale = None
    if c.get("query_pre_attn_scalar") is not None:
        scale = hf_get(c, "query_pre_attn_scalar", "real") ** -0.5
    prf = c.get("partial_rotary_factor")
    if prf is None:
        prf = (c.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    eps_key = "layer_norm_eps" if bert else "rms_norm_eps"
    args = dict(
        num_kv_heads=hf_get(c, "num_key_value_heads", "int", h, lo=1),
        head_dim=hf_get(c, "head_dim", "int", None, lo=1), qkv_bias=qkv_bias,
        out_bias=out_bias, qk_norm=mt.startswith("qwen3"),
        norm_eps=hf_get(c, eps_key, "real", 1e-6), rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=check_real("config['partial_rotary_factor']", prf),
        sliding_window=window, causal=not bert,
        softcap=hf_get(c, "attn_logit_softcapping", "real", 0.0), scale=scale)
    return hidden, h, args


def mla_args(config):
    """(hidden_size, num_heads, the other constructor arguments) of
    :meth:`MultiHeadLatentAttention.from_hf_config
    <numba_attn.MultiHeadLatentAttention.from_hf_config>`."""
    c = hf_dict(config)
    if c.get("kv_lora_rank") is None:
        raise AttentionError(f"config: model_type {c.get('model_type')!r} has no "
                             f"kv_lora_rank: not a latent-attention (DeepSeek) config; "
                             f"use MultiHeadAttention.from_hf_config")
    theta, scaling = hf_rope(c)
    args = dict(kv_lora_rank=hf_get(c, "kv_lora_rank", "int", lo=1),
                qk_nope_head_dim=hf_get(c, "qk_nope_head_dim", "int", lo=1),
                qk_rope_head_dim=hf_get(c, "qk_rope_head_dim", "int", lo=1),
                v_head_dim=hf_get(c, "v_head_dim", "int", lo=1),
                q_lora_rank=hf_get(c, "q_lora_rank", "int", None, lo=1),
                attention_bias=hf_get(c, "attention_bias", "flag", False),
                norm_eps=hf_get(c, "rms_norm_eps", "real", 1e-6), rope_theta=theta,
                rope_scaling=scaling,
                rotary_interleaved=hf_get(c, "rope_interleave", "flag", True))
    return (hf_get(c, "hidden_size", "int", lo=1),
            hf_get(c, "num_attention_heads", "int", lo=1), args)
