"""The Hugging Face transformers backend (numba_attn.integrations.transformers) on tiny
random Llama, Qwen2, Mistral (sliding window), Gemma-2 (softcap + sliding window) and
GPT-OSS (attention sinks + sliding window) models.

Expected values come from the same model run in float64 with ``oracle64``: a plain torch
float64 attention written here (no numba_attn inside, softmax in float64). Tolerances follow
the twice-naive-error rule: numba_attn must be within twice the error of
``attn_implementation="eager"`` in the same precision (plus a floor of a few ulps of the
value's scale, for tensors where eager happens to land almost exactly). Greedy tokens must
equal eager's.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from numba_attn.integrations import transformers as nt  # noqa: E402

VOCAB, SEQ = 97, 24


def oracle_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                   sliding_window=None, softcap=None, is_causal=None, s_aux=None, **kwargs):
    """Float64 attention in plain torch, HF semantics (SDPA's rule when the mask is None)."""
    q, k, v = query.double(), key.double(), value.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sq, sk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if attention_mask is None:
        allow = torch.ones(sq, sk, dtype=torch.bool)
        causal = is_causal if is_causal is not None else module.is_causal
        if causal and sq > 1:
            allow = torch.ones(sq, sk, dtype=torch.bool).tril()
    elif attention_mask.dtype == torch.bool:
        allow = attention_mask
    else:
        s, allow = s + attention_mask.double(), torch.ones((), dtype=torch.bool)
    s = s.masked_fill(~allow, -torch.inf)
    if s_aux is not None:
        sink = s_aux.double().reshape(1, -1, 1, 1).expand(s.shape[0], -1, sq, 1)
        s = torch.cat([s, sink], dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)[..., :sk]
    return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # threading_layer=None: the suite's Numba threads stay as they are (see the child test)
    assert nt.register(threading_layer=None) == "numba_attn"
    AttentionInterface.register("oracle64", oracle_forward)
    AttentionMaskInterface.register("oracle64", sdpa_mask)


def _config(family):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.1)  # 5x HF's default: attention shapes the logits more

    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":  # q/k/v biases
        return transformers.Qwen2Config(**common)
    if family == "mistral":  # the window binds: SEQ > 8
        return transformers.MistralConfig(sliding_window=8, **common)
    if family == "gemma2":  # softcap small enough to bend the scores; alternating windows
        return transformers.Gemma2Config(
            head_dim=16, sliding_window=8, attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"], **common)
    if family == "gpt_oss":  # attention sinks (s_aux) + alternating windows, tiny MoE
        return transformers.GptOssConfig(
            head_dim=16, sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
            experts_implementation="eager", **common)  # grouped_mm has no float64
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gpt_oss"]
_MODELS: dict = {}


def models(family):
    """{implementation: model} with the same random weights, float32 and float64 copies."""
    if family not in _MODELS:
        torch.manual_seed(1234)
        base = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(_config(family)), attn_implementation="eager")
        with torch.no_grad():  # sinks of order 1, so they move the softmax
            for name, p in base.named_parameters():
                if name.endswith("self_attn.sinks"):
                    p.normal_(0.0, 1.0)
        state = base.state_dict()
        out = {}
        for impl in ("eager", "numba_attn", "oracle64"):
            for dtype in (torch.float32, torch.float64):
                m = transformers.AutoModelForCausalLM.from_config(
                    copy.deepcopy(_config(family)), attn_implementation=impl)
                m.load_state_dict(state)
                out[impl, dtype] = m.to(dtype).eval()
        _MODELS[family] = out
    return _MODELS[family]


def _ids(batch=2, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def _left_padded():
    ids = _ids(3, SEQ, seed=1)
    am = torch.ones_like(ids)
    am[0, :7] = 0      # left padding of 7 and 3 tokens; row 2 unpadded
    am[1, :3] = 0
    ids[am == 0] = 0
    return ids, am


def _bound(got, eager, ref, floor_ulps=8):
    """Twice eager's error plus a floor of a few ulps of the reference's scale."""
    eps = torch.finfo(got.dtype).eps
    scale = ref.abs().max().item()
    return 2 * (eager - ref).abs().max().item() + floor_ulps * eps * max(scale, 1e-30)


def _check_close(name, got, eager, ref):
    err = (got.double() - ref).abs().max().item()
    bound = _bound(got, eager.double(), ref)
    assert err <= bound, f"{name}: |numba_attn - oracle64| = {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager(family, dtype):
    ms = models(family)
    ids = _ids()
    with torch.no_grad():
        ref = ms["oracle64", torch.float64](ids).logits
        eager = ms["eager", dtype](ids).logits
        got = ms["numba_attn", dtype](ids).logits
    assert got.dtype == dtype
    _check_close(f"{family} {dtype} logits", got, eager, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_eager(family):
    """Left padding (attention_mask): logits of the real tokens, float32."""
    ms = models(family)
    ids, am = _left_padded()
    real = am.bool()
    with torch.no_grad():
        ref = ms["oracle64", torch.float64](ids, attention_mask=am).logits[real]
        eager = ms["eager", torch.float32](ids, attention_mask=am).logits[real]
        got = ms["numba_attn", torch.float32](ids, attention_mask=am).logits[real]
    _check_close(f"{family} padded logits", got, eager, ref)
    # and each padded row equals the same row run alone, unpadded
    with torch.no_grad():
        alone = ms["numba_attn", torch.float32](ids[:1, 7:]).logits[0]
    np.testing.assert_allclose(got[:SEQ - 7].numpy(), alone.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_eager(family, dtype):
    """Every parameter's gradient of the LM loss (training mode, no dropout)."""
    ms = models(family)
    ids = _ids(seed=2)
    grads = {}
    for impl, dt in (("oracle64", torch.float64), ("eager", dtype), ("numba_attn", dtype)):
        m = ms[impl, dt]
        m.train()
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids).loss.backward()
        grads[impl] = {n: p.grad.detach().clone() for n, p in m.named_parameters()
                       if p.grad is not None}
        m.zero_grad(set_to_none=True)
        m.eval()
    assert grads["numba_attn"].keys() == grads["oracle64"].keys()
    assert len(grads["numba_attn"]) == sum(1 for _ in ms["eager", dtype].parameters())
    for name, ref in grads["oracle64"].items():
        _check_close(f"{family} grad {name}", grads["numba_attn"][name],
                     grads["eager"][name], ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_eager(family):
    """generate() through HF's DynamicCache: prefill then decode steps; left-padded batch."""
    ms = models(family)
    ids, am = _left_padded()
    kw = dict(attention_mask=am, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ms["eager", torch.float32].generate(ids, **kw)
        got = ms["numba_attn", torch.float32].generate(ids, **kw)
    assert want.shape[1] == SEQ + 12
    assert torch.equal(got, want), f"{family}: greedy tokens differ\n{got}\n{want}"


# --- attention_forward alone: the options the four models above do not reach -------------

class _Layer(torch.nn.Module):
    def __init__(self, is_causal=True):
        super().__init__()
        self.is_causal = is_causal


def _qkv(b=2, h=4, hkv=2, sq=9, sk=9, d=16, dtype=torch.float64, seed=3, layout="bshd"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g, dtype=dtype)
    if layout == "bshd":  # HF's projections: (b, s, h, d) storage seen as (b, h, s, d)
        k = torch.randn(b, sk, hkv, d, generator=g, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, sk, hkv, d, generator=g, dtype=dtype).transpose(1, 2)
    else:  # a KV cache: (b, h, s, d) storage
        k = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
        v = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    return q, k, v


def _compare(module, q, k, v, mask, **kw):
    got, w = nt.attention_forward(module, q, k, v, mask, **kw)
    want, _ = oracle_forward(module, q, k, v, mask, **kw)
    assert w is None and got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)


CASES = {
    "causal": dict(),
    "causal-sq1-decode": dict(sq=1, sk=13),
    "top-left-sq<sk": dict(sq=5, sk=11),          # SDPA's is_causal with an empty static tail
    "noncausal": dict(is_causal=False),
    "sinks": dict(sinks=True),
    "sinks-window": dict(sinks=True, sliding_window=4),
    "window-no-mask": dict(sliding_window=3),
    "window-decode": dict(sq=1, sk=13, sliding_window=5),
    "window-bidirectional": dict(is_causal=False, sliding_window=3),
    "softcap-scale": dict(softcap=1.5, scaling=0.3),
    "bool-mask": dict(mask="bool"),
    "bool-mask-per-head": dict(mask="bool-heads"),
    "float-mask": dict(mask="float"),
    "position-bias": dict(position_bias=True),
}


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_forward_options(case, layout):
    c = dict(CASES[case])
    sq, sk = c.pop("sq", 9), c.pop("sk", 9)
    q, k, v = _qkv(sq=sq, sk=sk, layout=layout)
    module = _Layer(c.pop("is_causal", True))
    g = torch.Generator().manual_seed(5)
    kind = c.pop("mask", None)
    mask = None
    if kind is not None:
        heads = 4 if kind == "bool-heads" else 1
        mask = torch.rand(2, heads, sq, sk, generator=g) > 0.3
        mask[..., 0] = True
        if kind == "float":
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(
                ~mask, torch.finfo(torch.float64).min)
    if c.pop("sinks", False):
        c["s_aux"] = torch.randn(4, generator=g, dtype=torch.float64)
    if c.pop("position_bias", False):
        c["position_bias"] = torch.randn(1, 4, sq, sk, generator=g, dtype=torch.float64)
        kw = dict(c)
        got, _ = nt.attention_forward(module, q, k, v, None, **kw)
        pb = kw.pop("position_bias")
        want, _ = oracle_forward(module, q, k, v,
                                 pb + torch.ones(sq, sk).tril().log(), **kw)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)
        return
    if "sliding_window" in c and mask is None:
        # the oracle sees windows only through masks (as HF builds them)
        w = c["sliding_window"]
        i = torch.arange(sq)[:, None] + (sk - sq if sq == 1 else 0)
        j = torch.arange(sk)[None, :]
        allow = (i - j < w) & ((j <= i) if module.is_causal else (j - i < w))
        kw = {n: x for n, x in c.items() if n != "sliding_window"}
        got, _ = nt.attention_forward(module, q, k, v, None, **c)
        want, _ = oracle_forward(module, q, k, v, allow, **kw)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)
        return
    _compare(module, q, k, v, mask, **c)


def test_attention_forward_gradients_with_sinks():
    """q, k, v and the sinks get the oracle's gradients (GPT-OSS-style layer)."""
    module = _Layer()
    q, k, v = _qkv(sq=7, sk=7)
    sinks = torch.randn(4, dtype=torch.float64)
    dout = torch.randn(2, 7, 4, 16, dtype=torch.float64)
    grads = []
    for fn in (nt.attention_forward, oracle_forward):
        xs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, sinks)]
        out, _ = fn(module, *xs[:3], None, s_aux=xs[3], sliding_window=4)
        if fn is oracle_forward:  # the oracle needs the window as a mask
            i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
            out, _ = fn(module, *xs[:3], (j <= i) & (i - j < 4), s_aux=xs[3])
        (out * dout).sum().backward()
        grads.append([x.grad for x in xs])
    for name, a, b in zip("q k v sinks".split(), *grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-10, err_msg=name)


def test_dropout_draws_from_torchs_generator():
    """Training-mode dropout: repeatable under torch.manual_seed, new masks otherwise, and
    unbiased (the mean over many seeds approaches the dropout-free output)."""
    module = _Layer()
    module.train()
    q, k, v = _qkv(sq=8, sk=8)

    def run(seed):
        torch.manual_seed(seed)
        return nt.attention_forward(module, q, k, v, None, dropout=0.25)[0]

    plain = nt.attention_forward(module, q, k, v, None)[0]
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    mean = torch.stack([run(s) for s in range(200)]).mean(0)
    assert (mean - plain).abs().max() < 0.1 * plain.abs().max()
    module.eval()  # HF passes dropout=0.0 outside training; a module in eval mode ignores it
    torch.manual_seed(7)
    assert torch.equal(nt.attention_forward(module, q, k, v, None, dropout=0.25)[0], plain)


def test_unsupported_features_are_named():
    q, k, v = _qkv()
    with pytest.raises(nt.UnsupportedFeature, match="output_attentions"):
        nt.attention_forward(_Layer(), q, k, v, None, output_attentions=True)
    with pytest.raises(nt.UnsupportedFeature, match="BlockMask"):
        nt.attention_forward(_Layer(), q, k, v, object())
    cfg = _config("llama")
    cfg.output_attentions = True
    with pytest.raises(nt.UnsupportedFeature, match="output_attentions"):
        nt.check(cfg)
    assert nt.check(models("llama")["numba_attn", torch.float32]) is not None
    assert nt.unsupported_reasons(_config("llama")) == []


@pytest.mark.parametrize("env, want",
                         [({}, "workqueue"), ({"NUMBA_THREADING_LAYER": "omp"}, "omp")],
                         ids=["default", "user-choice"])
def test_register_picks_the_threading_layer_before_numbas_threads_start(env, want):
    """In a fresh process register() selects workqueue unless the user chose a layer."""
    import os
    import subprocess
    import sys

    code = ("import torch, numpy as np, numba, numba_attn\n"
            "from numba_attn.integrations import transformers as nt\n"
            "nt.register()\n"
            "q = np.ones((1, 1, 2, 8), np.float32)\n"
            "numba_attn.attention(q, q, q)\n"
            "print(numba.threading_layer())\n")
    env = {**{k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}, **env}
    try:
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("child process timed out")
    if want == "omp" and "omp" not in got.stdout and "No threading layer" in got.stderr:
        pytest.skip("Numba's omp layer is not available here")
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip().splitlines()[-1] == want
