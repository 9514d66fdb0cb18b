"""Layer backward (MultiHeadAttention.backward), rms_norm_backward and apply_rotary_backward
against central finite differences of the forward (float64)."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn as na
from numba_attn.config import AttentionError

ATTR = {"q_proj.weight": "w_q", "k_proj.weight": "w_k", "v_proj.weight": "w_v",
        "o_proj.weight": "w_o", "q_proj.bias": "b_q", "k_proj.bias": "b_k",
        "v_proj.bias": "b_v", "o_proj.bias": "b_o", "q_norm.weight": "q_norm",
        "k_norm.weight": "k_norm"}


def _fd(loss, x, eps=1e-6):
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for n in range(flat.size):
        old = flat[n]
        flat[n] = old + eps
        up = loss()
        flat[n] = old - eps
        dn = loss()
        flat[n] = old
        gflat[n] = (up - dn) / (2 * eps)
    return g


def _assert_fd(got, loss, x, what):
    np.testing.assert_allclose(got, _fd(loss, x), atol=1e-7, rtol=1e-5, err_msg=what)


def test_rms_norm_backward(rng):
    x = rng.standard_normal((2, 3, 5))
    w = rng.standard_normal(5)
    dy = rng.standard_normal(x.shape)
    dx, dw = na.rms_norm_backward(dy, x, w, eps=1e-3)

    def loss():
        return float(np.sum(na.rms_norm(x, w, eps=1e-3) * dy))

    _assert_fd(dx, loss, x, "dx")
    _assert_fd(dw, loss, w, "dweight")


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_backward_partial(rng, interleaved):
    cos, sin = na.rotary_cos_sin(16, 4)  # rotary_dim 4 of head_dim 6: partial
    x = rng.standard_normal((2, 3, 2, 6))
    pos = np.array([[0, 5, 9], [1, 2, 15]])
    dy = rng.standard_normal(x.shape)
    dx = na.apply_rotary_backward(dy, cos, sin, interleaved=interleaved, positions=pos)

    def loss():
        return float(np.sum(na.apply_rotary(x, cos, sin, interleaved=interleaved,
                                            positions=pos) * dy))

    _assert_fd(dx, loss, x, "dx")


LAYERS = {
    "gqa-rope-qknorm-bias-lora": {
        "layer": {"hidden_size": 8, "num_heads": 4, "num_kv_heads": 2, "head_dim": 4, "qkv_bias": True,
                   "out_bias": True, "qk_norm": True, "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                   "rotary_interleaved": True, "softcap": 5.0, "rope_scaling": {"rope_type": "linear",
                                                                       "factor": 2.0}},
        "lora": ("q", "k", "v", "o"), "dropout": 0.0},
    "mqa-window-dropout": {
        "layer": {"hidden_size": 6, "num_heads": 3, "num_kv_heads": 1, "head_dim": 2, "rope_theta": 100.0,
                   "sliding_window": 2},
        "lora": ("v",), "dropout": 0.3},
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_backward_matches_finite_differences(rng, name):
    spec = LAYERS[name]
    layer = na.MultiHeadAttention(dtype=np.float64, seed=1, **spec["layer"])
    e = layer.hidden_size
    outs = {"q": layer.num_heads * layer.head_dim, "k": layer.num_kv_heads * layer.head_dim,
            "v": layer.num_kv_heads * layer.head_dim, "o": e}
    ins = {"q": e, "k": e, "v": e, "o": layer.num_heads * layer.head_dim}
    lora = {t: (rng.standard_normal((2, ins[t])), rng.standard_normal((outs[t], 2)))
            for t in spec["lora"]}
    x = rng.standard_normal((2, 4, e))
    kw = {"lora": lora, "lora_scale": 0.5}
    if spec["dropout"]:
        kw.update(dropout_p=spec["dropout"], seed=4)
    y = layer.forward(x, train=True, **kw)
    dy = rng.standard_normal(y.shape)
    dx, grads = layer.backward(dy)
    np.testing.assert_allclose(y, layer.forward(x, train=True, **kw), atol=0)
    if not spec["dropout"]:
        np.testing.assert_allclose(y, layer.forward(x, **kw), atol=1e-12)

    def loss():
        return float(np.sum(layer.forward(x, train=True, **kw) * dy))

    _assert_fd(dx, loss, x, "dx")
    expected_keys = {n for n, _ in layer.named_parameters()} | {
        f"lora.{t}.{m}" for t in spec["lora"] for m in "AB"}
    assert set(grads) == expected_keys
    for key, g in grads.items():
        if key.startswith("lora."):
            _, t, m = key.split(".")
            target = lora[t][0 if m == "A" else 1]
        else:
            target = getattr(layer, ATTR[key])
        _assert_fd(g, loss, target, key)


def test_cross_attention_backward_gives_dcontext(rng):
    layer = na.MultiHeadAttention(8, 2, 1, dtype=np.float64, seed=0, rope_theta=1e4)
    x = rng.standard_normal((1, 3, 8))
    ctx = rng.standard_normal((1, 5, 8))
    y = layer.forward(x, context=ctx, train=True)
    dy = rng.standard_normal(y.shape)
    dx, dctx, grads = layer.backward(dy)

    def loss():
        return float(np.sum(layer.forward(x, context=ctx, train=True) * dy))

    _assert_fd(dx, loss, x, "dx")
    _assert_fd(dctx, loss, ctx, "dcontext")
    _assert_fd(grads["k_proj.weight"], loss, layer.w_k, "k_proj.weight")


def test_backward_errors(rng):
    layer = na.MultiHeadAttention(8, 2, dtype=np.float64, seed=0)
    with pytest.raises(AttentionError, match="train=True"):
        layer.backward(np.ones((1, 3, 8)))
    with pytest.raises(AttentionError, match="dropout_p"):
        layer.forward(np.ones((1, 3, 8)), dropout_p=0.1, seed=1)
    cache = na.KVCache(1, 8, num_kv_heads=2, head_dim=4, dtype=np.float64)
    with pytest.raises(AttentionError, match="cache"):
        layer.forward(np.ones((1, 3, 8)), cache=cache, train=True)


MLA_ATTR = {"q_proj.weight": "w_q", "q_a_proj.weight": "w_q_a", "q_a_proj.bias": "b_q_a",
            "q_a_layernorm.weight": "q_a_norm", "q_b_proj.weight": "w_q_b",
            "kv_a_proj_with_mqa.weight": "w_kv_a", "kv_a_proj_with_mqa.bias": "b_kv_a",
            "kv_a_layernorm.weight": "kv_a_norm", "kv_b_proj.weight": "w_kv_b",
            "o_proj.weight": "w_o", "o_proj.bias": "b_o"}


@pytest.mark.parametrize("q_lora_rank,bias", [(None, False), (6, True)])
def test_mla_backward_matches_finite_differences(rng, q_lora_rank, bias):
    mla = na.MultiHeadLatentAttention(8, 2, q_lora_rank=q_lora_rank, kv_lora_rank=4,
                                      qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=3,
                                      attention_bias=bias, dtype=np.float64, seed=2)
    for name, value in mla.named_parameters():  # norms and biases away from 1 / 0
        value += 0.1 * rng.standard_normal(value.shape)
    x = rng.standard_normal((2, 4, 8))
    y = mla.forward(x, train=True)
    np.testing.assert_allclose(y, mla.forward(x), atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, grads = mla.backward(dy)

    def loss():
        return float(np.sum(mla.forward(x, train=True) * dy))

    _assert_fd(dx, loss, x, "dx")
    assert set(grads) == {n for n, _ in mla.named_parameters()}
    for key, g in grads.items():
        _assert_fd(g, loss, getattr(mla, MLA_ATTR[key]), key)


@pytest.mark.parametrize("make", [
    lambda b: na.MultiHeadAttention(16, 4, 2, rope_theta=1e4, seed=0, **b),
    lambda b: na.MultiHeadLatentAttention(16, 2, kv_lora_rank=8, qk_nope_head_dim=4,
                                          qk_rope_head_dim=2, v_head_dim=4, seed=0, **b),
], ids=["mha", "mla"])
def test_train_forward_runs_on_the_layers_backend(monkeypatch, make):
    """forward(train=True) and backward use the backend the inference forward would:
    the call's, else the layer's ("auto" by default), never a forced "cpu"."""
    import numba_attn.backward as bwd
    import numba_attn.functional as fn

    seen = []

    def spy(real):
        def call(*a, **kw):
            seen.append(kw.get("backend"))
            return real(*a, **kw)
        return call

    monkeypatch.setattr(fn, "attention", spy(fn.attention))
    monkeypatch.setattr(bwd, "attention_backward", spy(bwd.attention_backward))
    x = np.random.default_rng(0).standard_normal((1, 3, 16))
    for ctor, call, want in (({}, None, "auto"), ({"backend": "reference"}, None, "reference"),
                             ({"backend": "reference"}, "cpu", "cpu")):
        layer = make(dict(ctor, dtype=np.float64))
        seen.clear()
        y = layer.forward(x, train=True, backend=call)
        layer.backward(np.ones_like(y))
        assert seen == [want, want], (ctor, call, seen)
