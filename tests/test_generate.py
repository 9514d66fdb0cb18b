"""examples/decoder.py and examples/generate.py on tiny random-weight checkpoints.

Each family (Llama with llama3 rope scaling, Mistral with a sliding window, Qwen2 with
q/k/v bias and tied embeddings, Qwen3 with QK-norm, head_dim != hidden / heads and
sliding upper layers, Gemma-2 with softcaps, query_pre_attn_scalar, alternating windows
and sandwich norms) is written to safetensors files here (float32, bfloat16, sharded) and
compared with ``oracle_logits``: an independent float64 numpy implementation written
from the published architectures (attention as a softmax over the full score matrix, no
numba_attn). Where torch and transformers are installed, the logits are also compared
with Hugging Face's own modules. Nothing downloads.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numerics import expected_inv_freq

pytest.importorskip("safetensors")
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
decoder = pytest.importorskip("decoder")
generate = pytest.importorskip("generate")

BASE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, vocab_size=61, num_hidden_layers=2, rms_norm_eps=1e-5,
            rope_theta=10000.0, eos_token_id=None, bos_token_id=None, pad_token_id=None)
CONFIGS = {
    "llama": dict(BASE, model_type="llama", tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        hidden_act="silu"),
    "llama-bias": dict(BASE, model_type="llama", attention_bias=True, mlp_bias=True,
                       tie_word_embeddings=True, hidden_act="silu"),
    "mistral": dict(BASE, model_type="mistral", sliding_window=4, hidden_act="silu",
                    tie_word_embeddings=False),
    "qwen2": dict(BASE, model_type="qwen2", tie_word_embeddings=True,
                  use_sliding_window=False, hidden_act="silu"),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=16, tie_word_embeddings=False,
                  use_sliding_window=True, sliding_window=3, max_window_layers=1,
                  hidden_act="silu"),
    "gemma2": dict(BASE, model_type="gemma2", head_dim=16, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                   sliding_window=4, hidden_activation="gelu_pytorch_tanh",
                   hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
}
FAMILIES = list(CONFIGS)


# ---------------------------------------------------------------------------------------
# tiny checkpoints
# ---------------------------------------------------------------------------------------
def dims(cfg):
    h = cfg["num_attention_heads"]
    return (cfg["hidden_size"], h, cfg["num_key_value_heads"],
            cfg.get("head_dim") or cfg["hidden_size"] // h, cfg["intermediate_size"],
            cfg["vocab_size"])


def random_weights(cfg, seed):
    """Hugging Face names and shapes of each family, random values (float64)."""
    rng = np.random.default_rng(seed)
    e, h, hkv, d, inter, v = dims(cfg)
    mt = cfg["model_type"]

    def mat(n_out, n_in):
        return rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)

    def gain(n):  # Gemma stores (gain - 1)
        return (0.0 if mt == "gemma2" else 1.0) + 0.2 * rng.standard_normal(n)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, e)),
         "model.norm.weight": gain(e)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(v, e)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        w.update({a + "q_proj.weight": mat(h * d, e), a + "k_proj.weight": mat(hkv * d, e),
                  a + "v_proj.weight": mat(hkv * d, e), a + "o_proj.weight": mat(e, h * d),
                  p + "mlp.gate_proj.weight": mat(inter, e),
                  p + "mlp.up_proj.weight": mat(inter, e),
                  p + "mlp.down_proj.weight": mat(e, inter),
                  p + "input_layernorm.weight": gain(e),
                  p + "post_attention_layernorm.weight": gain(e)})
        if mt == "qwen2" or cfg.get("attention_bias"):
            for n, size in (("q", h * d), ("k", hkv * d), ("v", hkv * d)):
                w[f"{a}{n}_proj.bias"] = 0.3 * rng.standard_normal(size)
        if cfg.get("attention_bias"):
            w[a + "o_proj.bias"] = 0.3 * rng.standard_normal(e)
        if cfg.get("mlp_bias"):
            for n, size in (("gate", inter), ("up", inter), ("down", e)):
                w[f"{p}mlp.{n}_proj.bias"] = 0.3 * rng.standard_normal(size)
        if mt == "qwen3":
            w[a + "q_norm.weight"], w[a + "k_norm.weight"] = gain(d), gain(d)
        if mt == "gemma2":
            w[p + "pre_feedforward_layernorm.weight"] = gain(e)
            w[p + "post_feedforward_layernorm.weight"] = gain(e)
    return w


def write_model(path, cfg, weights, storage="float32"):
    """config.json + model.safetensors (float32 / bfloat16) or two shards and an index.
    Returns the weights as stored, in float64 (what the oracle must use)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if storage == "bfloat16":
        import ml_dtypes

        stored = {k: np.ascontiguousarray(a, dtype=ml_dtypes.bfloat16)
                  for k, a in weights.items()}
    elif storage == "float16":
        stored = {k: np.ascontiguousarray(a, dtype=np.float16) for k, a in weights.items()}
    else:
        stored = {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in weights.items()}
    if storage == "sharded":
        names = sorted(stored)
        shards = {"model-00001-of-00002.safetensors": names[::2],
                  "model-00002-of-00002.safetensors": names[1::2]}
        for file, part in shards.items():
            save_file({k: stored[k] for k in part}, str(path / file))
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": 0},
             "weight_map": {k: f for f, part in shards.items() for k in part}}))
    else:
        save_file(stored, str(path / "model.safetensors"))
    return {k: np.asarray(a, dtype=np.float64) for k, a in stored.items()}


# ---------------------------------------------------------------------------------------
# the oracle: float64 numpy from the papers / model cards, full score matrices
# ---------------------------------------------------------------------------------------
def oracle_logits(cfg, w, ids):
    """Logits (len(ids), vocab) of one sequence."""
    mt = cfg["model_type"]
    gemma = mt == "gemma2"
    e, h, hkv, d, _, _ = dims(cfg)
    eps = cfg["rms_norm_eps"]
    n = len(ids)

    def norm(x, g):
        y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
        return y * ((1.0 + g) if gemma else g)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    inv = expected_inv_freq(d, cfg["rope_theta"], cfg.get("rope_scaling"))
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(t):  # GPT-NeoX halves
        a, b = t[..., :d // 2], t[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def sliding(i):
        if mt == "gemma2":
            return i % 2 == 0
        if mt == "mistral":
            return cfg.get("sliding_window") is not None
        if mt == "qwen3":
            return cfg["use_sliding_window"] and i >= cfg["max_window_layers"]
        return False

    def act(x):
        if gemma:
            return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
        return x / (1 + np.exp(-x))

    x = w["model.embed_tokens.weight"][np.asarray(ids)]
    if gemma:
        x = x * np.sqrt(e)
    qi, kj = np.arange(n)[:, None], np.arange(n)[None, :]
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        a = p + "self_attn."
        hs = norm(x, w[p + "input_layernorm.weight"])
        q = hs @ w[a + "q_proj.weight"].T + w.get(a + "q_proj.bias", 0.0)
        k = hs @ w[a + "k_proj.weight"].T + w.get(a + "k_proj.bias", 0.0)
        v = hs @ w[a + "v_proj.weight"].T + w.get(a + "v_proj.bias", 0.0)
        q, k, v = q.reshape(n, h, d), k.reshape(n, hkv, d), v.reshape(n, hkv, d)
        if mt == "qwen3":
            q, k = rms(q, w[a + "q_norm.weight"]), rms(k, w[a + "k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, h // hkv, axis=1), np.repeat(v, h // hkv, axis=1)
        scale = cfg["query_pre_attn_scalar"] ** -0.5 if gemma else d ** -0.5
        s = np.einsum("ihd,jhd->hij", q, k) * scale
        if cfg.get("attn_logit_softcapping"):
            c = cfg["attn_logit_softcapping"]
            s = c * np.tanh(s / c)
        visible = kj <= qi
        if sliding(li):
            visible &= qi - kj < cfg["sliding_window"]
        s = np.where(visible, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hij,jhd->ihd", pr, v).reshape(n, h * d) @ w[a + "o_proj.weight"].T
        o = o + w.get(a + "o_proj.bias", 0.0)
        if gemma:
            o = norm(o, w[p + "post_attention_layernorm.weight"])
        x = x + o
        hs = norm(x, w[p + ("pre_feedforward_layernorm.weight" if gemma
                            else "post_attention_layernorm.weight")])
        gate = hs @ w[p + "mlp.gate_proj.weight"].T + w.get(p + "mlp.gate_proj.bias", 0.0)
        up = hs @ w[p + "mlp.up_proj.weight"].T + w.get(p + "mlp.up_proj.bias", 0.0)
        m = (act(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        m = m + w.get(p + "mlp.down_proj.bias", 0.0)
        if gemma:
            m = norm(m, w[p + "post_feedforward_layernorm.weight"])
        x = x + m
    x = norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight" if cfg["tie_word_embeddings"] else "lm_head.weight"]
    logits = x @ head.T
    if cfg.get("final_logit_softcapping"):
        c = cfg["final_logit_softcapping"]
        logits = c * np.tanh(logits / c)
    return logits


def oracle_greedy(cfg, w, prompt, n_new):
    """Greedy ids, recomputing the whole sequence at every step."""
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(np.argmax(oracle_logits(cfg, w, seq)[-1])))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{(family, storage): (dir, cfg, stored float64 weights)}, written on demand."""
    made = {}

    def get(family, storage="float32"):
        key = (family, storage)
        if key not in made:
            if storage == "bfloat16":
                pytest.importorskip("ml_dtypes")
            cfg = CONFIGS[family]
            path = tmp_path_factory.mktemp(f"{family}-{storage}")
            seed = FAMILIES.index(family)
            made[key] = (path, cfg, write_model(path, cfg, random_weights(cfg, seed),
                                                storage))
        return made[key]
    return get


PROMPT = [3, 17, 5, 42, 8, 11, 29, 2, 50, 7]  # longer than every window


# ---------------------------------------------------------------------------------------
# logits of a forward pass
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_float64_matches_oracle(models, family):
    path, cfg, w = models(family)
    model = decoder.Decoder.from_pretrained(path, dtype=np.float64)
    got = model.forward(np.array([PROMPT]))[0]
    expected = oracle_logits(cfg, w, PROMPT)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_float32_matches_oracle(models, family):
    path, cfg, w = models(family)
    model = decoder.Decoder.from_pretrained(path)
    assert model.weight_dtype == np.float32
    got = model.forward(np.array([PROMPT]))[0]
    np.testing.assert_allclose(got, oracle_logits(cfg, w, PROMPT), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_bfloat16_checkpoint_keeps_bfloat16_weights(models, family):
    """A BF16 checkpoint: matrices stay bfloat16, compute float32; the oracle runs on the
    same bfloat16-rounded weights in float64."""
    path, cfg, w = models(family, "bfloat16")
    model = decoder.Decoder.from_pretrained(path)
    assert model.weight_dtype.name == "bfloat16"
    assert model.layers[0].attn.w_q.dtype.name == "bfloat16"
    assert model.lm_head.dtype.name == "bfloat16"
    expected = oracle_logits(cfg, w, PROMPT)
    got = model.forward(np.array([PROMPT]))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the same checkpoint widened to float64 at load is exact
    wide = decoder.Decoder.from_pretrained(path, dtype=np.float64)
    np.testing.assert_allclose(wide.forward(np.array([PROMPT]))[0], expected, rtol=1e-9,
                               atol=1e-9)


def test_float16_checkpoint_is_widened(models):
    path, cfg, w = models("mistral", "float16")
    model = decoder.Decoder.from_pretrained(path)
    assert model.weight_dtype == np.float32 and model.lm_head.dtype == np.float32
    np.testing.assert_allclose(model.forward(np.array([PROMPT]))[0],
                               oracle_logits(cfg, w, PROMPT), rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint(models):
    path, cfg, w = models("qwen2", "sharded")
    assert (path / "model.safetensors.index.json").is_file()
    model = decoder.Decoder.from_pretrained(path, dtype=np.float64)
    np.testing.assert_allclose(model.forward(np.array([PROMPT]))[0],
                               oracle_logits(cfg, w, PROMPT), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------
# generation through paged caches
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_paged_equals_full_recompute(models, family):
    path, cfg, w = models(family)
    model = decoder.Decoder.from_pretrained(path, dtype=np.float64)
    got = model.generate([PROMPT[:5]], 8, block_size=3)[0]  # pages of 3: many boundaries
    assert got == oracle_greedy(cfg, w, PROMPT[:5], 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_prefill_and_decode_logits_match_oracle(models, family):
    """Rows of 6 and 2 prompt tokens in one paged cache, then decode steps: every row's
    logits are the oracle's for that row's own sequence."""
    path, cfg, w = models(family)
    model = decoder.Decoder.from_pretrained(path, dtype=np.float64)
    caches = model.new_caches(2, 16, block_size=4)
    rows = [PROMPT[:6], PROMPT[6:8]]
    got = model.prefill(rows, caches)
    assert caches[0].seqlens.tolist() == [6, 2]
    for step in range(4):
        for b, seq in enumerate(rows):
            np.testing.assert_allclose(got[b], oracle_logits(cfg, w, seq)[-1], rtol=1e-9,
                                       atol=1e-9, err_msg=f"row {b}, step {step}")
        new = [PROMPT[9 - step], PROMPT[step]]
        rows = [seq + [t] for seq, t in zip(rows, new)]
        got = model.decode_step(new, caches)
    assert caches[0].seqlens.tolist() == [10, 6]


def test_float32_greedy_tracks_oracle(models):
    """float32 compute: every generated token is the oracle's argmax up to rounding (a
    token within 1e-4 of the oracle's best logit is accepted: a float32 near-tie)."""
    path, cfg, w = models("llama", "bfloat16")
    model = decoder.Decoder.from_pretrained(path)
    got = model.generate([PROMPT[:4]], 6)[0]
    seq = PROMPT[:4]
    for tok in got:
        logits = oracle_logits(cfg, w, seq)[-1]
        assert logits[tok] >= logits.max() - 1e-4
        seq = seq + [tok]


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen3"])
def test_ragged_batch_equals_one_at_a_time(models, family):
    path, cfg, w = models(family)
    model = decoder.Decoder.from_pretrained(path, dtype=np.float64)
    prompts = [PROMPT[:7], PROMPT[2:3], PROMPT[1:5]]
    batched = model.generate(prompts, 6, block_size=4)
    alone = [model.generate([p], 6, block_size=4)[0] for p in prompts]
    assert batched == alone
    assert batched[1] == oracle_greedy(cfg, w, prompts[1], 6)


def test_eos_stops_a_row(models):
    path, _, _ = models("llama")
    model = decoder.Decoder.from_pretrained(path, dtype=np.float64)
    free = model.generate([PROMPT[:5]], 8)[0]
    eos = free[2]
    got = model.generate([PROMPT[:5], PROMPT[:3]], 8, eos_token_ids=[eos])
    assert got[0] == free[:free.index(eos) + 1]
    alone = model.generate([PROMPT[:3]], 8, eos_token_ids=[eos])[0]
    assert got[1] == alone


def test_sampling_reproducible_and_row_independent(models):
    path, _, _ = models("qwen2")
    model = decoder.Decoder.from_pretrained(path)
    run = lambda prompts, seed: model.generate(
        prompts, 8, sampler=decoder.make_sampler(1.5, top_k=20, top_p=0.95, seed=seed))
    a = run([PROMPT[:4], PROMPT[:2]], 7)
    assert a == run([PROMPT[:4], PROMPT[:2]], 7)
    assert a[0] == run([PROMPT[:4]], 7)[0]  # a row draws from its own stream
    assert a[0] != run([PROMPT[:4]], 8)[0] or a[1] != run([PROMPT[:4], PROMPT[:2]], 8)[1]
    greedy = model.generate([PROMPT[:4]], 8)[0]
    assert model.generate([PROMPT[:4]], 8, sampler=decoder.make_sampler(
        1.0, top_k=1, seed=0))[0] == greedy


def test_sampler_distribution():
    """Draw frequencies follow softmax(logits / T) restricted to top-k / top-p."""
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    for kw, allowed in ((dict(top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
                        (dict(top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
                        (dict(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
                        (dict(), [0.5, 0.3, 0.15, 0.05])):
        sample = decoder.make_sampler(1.0, seed=1, **kw)
        counts = np.bincount([sample(0, logits) for _ in range(n)], minlength=4) / n
        p = np.array(allowed)
        assert np.all(counts[p == 0] == 0), kw
        assert np.all(np.abs(counts - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12), kw
    # temperature 0.5 squares the odds
    sample = decoder.make_sampler(0.5, seed=2)
    counts = np.bincount([sample(0, logits[:2]) for _ in range(n)], minlength=2) / n
    p0 = 0.25 / (0.25 + 0.09)
    assert abs(counts[0] - p0) <= 5 * math.sqrt(p0 * (1 - p0) / n)


def test_sampler_rejects_bad_options():
    for kw, name in ((dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
                     (dict(top_k=-1), "top_k")):
        with pytest.raises(ValueError, match=name):
            decoder.make_sampler(**{"temperature": 1.0, **kw})


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
def test_unsupported_model_type_names_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, model_type="gpt2")))
    with pytest.raises(ValueError, match="gpt2.*gemma2, llama, mistral, qwen2, qwen3"):
        decoder.Decoder.from_pretrained(tmp_path)


def test_bad_tensors_are_all_listed(tmp_path):
    from numba_attn import CheckpointError

    cfg = CONFIGS["llama"]
    w = {k: a.astype(np.float32) for k, a in random_weights(cfg, 0).items()}
    del w["model.layers.1.mlp.up_proj.weight"]
    w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.k_proj.weight"][:8]
    w["model.norm.weight"] = np.ones((33,), np.float32)
    w["lm_head.weight"] = w["lm_head.weight"].astype(np.int32)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        decoder.Decoder.from_pretrained(tmp_path)
    msg = str(err.value)
    for part in ("missing: model.layers.1.mlp.up_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight: expected (16, 32), got (8, 32)",
                 "model.norm.weight: expected (32,), got (33,)",
                 "lm_head.weight: I32"):
        assert part in msg, msg


def test_missing_shard(models, tmp_path):
    from numba_attn import CheckpointError

    src, _, _ = models("qwen2", "sharded")
    for f in src.iterdir():
        if "00002" not in f.name:
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00002"):
        decoder.Decoder.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------
def test_cli_ids_only(models, capsys):
    path, cfg, w = models("mistral")
    out = generate.main([str(path), "--prompt-ids", "3,17,5", "--max-new-tokens", "5",
                         "--greedy", "--ids-only"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert [int(t) for t in last.split()] == out[0]
    # float32 compute: tokens are the oracle's choices up to float32 near-ties
    seq = [3, 17, 5]
    for tok in out[0]:
        logits = oracle_logits(cfg, w, seq)[-1]
        assert logits[tok] >= logits.max() - 1e-4
        seq.append(tok)


def test_cli_batch_file_and_sampling(models, tmp_path, capsys):
    path, _, _ = models("qwen3")
    batch = tmp_path / "prompts.txt"
    batch.write_text("1,2,3,4,5,6\n\n9\n")
    args = [str(path), "--prompt-ids", "7,8", "--max-new-tokens", "4", "--ids-only",
            "--batch-file", str(batch)]
    out = generate.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [[int(t) for t in ln.split()] for ln in lines[-3:]] == out
    model = decoder.Decoder.from_pretrained(path)
    assert out == model.generate([[7, 8], [1, 2, 3, 4, 5, 6], [9]], 4)
    sampled = args + ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "10", "--seed",
                      "3"]
    assert generate.main(sampled) == generate.main(sampled)
    capsys.readouterr()


def test_cli_text_with_tokenizer(models, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    src, cfg, _ = models("gemma2")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    vocab = {f"w{i}": i for i in range(cfg["vocab_size"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(tmp_path / "tokenizer.json"))
    out = generate.main([str(tmp_path), "--prompt", "w3 w17 w5", "--max-new-tokens", "4"])
    text = capsys.readouterr().out.strip().splitlines()
    assert text[0] == " ".join(f"w{i}" for i in out[0])
    assert "tokens/s" in text[-1] and text[-1].startswith("4 tokens in")
    ids = generate.main([str(tmp_path), "--prompt", "w3 w17 w5", "--max-new-tokens", "4",
                         "--ids-only"])
    assert ids == out
    model = decoder.Decoder.from_pretrained(tmp_path)
    assert out[0] == model.generate([[3, 17, 5]], 4)[0]
    with pytest.raises(SystemExit, match="prompt 0 is empty"):
        generate.main([str(tmp_path), "--prompt", ""])


def test_cli_errors(models, capsys):
    path, _, _ = models("llama")
    for args, msg in ((["--prompt-ids", "1,2", "--greedy", "--temperature", "0.5"],
                       "--greedy cannot be combined with --temperature"),
                      (["--prompt-ids", "1,2", "--top-k", "3"], "need --temperature"),
                      (["--prompt-ids", "1,2", "--max-new-tokens", "-1"], ">= 0"),
                      (["--prompt", "hello"], "tokenizer.json"),
                      (["--prompt-ids", "1,2", "--prompt", "x"], "not allowed with")):
        with pytest.raises(SystemExit):
            generate.main([str(path)] + args)
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit, match="comma-separated token ids"):
        generate.main([str(path), "--prompt-ids", "1,x"])
    with pytest.raises(SystemExit, match=r"outside \[0, 61\).*\[99\]"):
        generate.main([str(path), "--prompt-ids", "1,99"])
    with pytest.raises(SystemExit):
        generate.main([str(path), "--prompt-ids", "1", "--batch-file", str(path / "no.txt")])
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no config.json"):
        generate.main([str(path / "nowhere"), "--prompt-ids", "1"])


def test_cli_runs_as_a_script(models):
    path, _, _ = models("llama")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), str(path),
                          "--prompt-ids", "3,17,5", "--max-new-tokens", "3", "--ids-only"],
                         check=False, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    ids = [int(t) for t in run.stdout.strip().splitlines()[-1].split()]
    model = decoder.Decoder.from_pretrained(path)
    assert ids == model.generate([[3, 17, 5]], 3)[0]


# ---------------------------------------------------------------------------------------
# Hugging Face's own modules (only where torch and transformers are installed)
# ---------------------------------------------------------------------------------------
_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@pytest.mark.skipif(not _HF, reason="needs torch and transformers")
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hugging_face(models, family):
    import torch
    import transformers

    path, cfg, w = models(family)
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).double().eval()
    state = {k: torch.from_numpy(a) for k, a in w.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0].numpy()
    got = decoder.Decoder.from_pretrained(path, dtype=np.float64).forward(np.array([PROMPT]))
    # HF computes the rotary angles in float32 even in a float64 model: float32 tolerance
    np.testing.assert_allclose(got[0], expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(oracle_logits(cfg, w, PROMPT), expected, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------
# KV-cache storage dtypes (--kv-cache-dtype)
# ---------------------------------------------------------------------------------------
# bound on max |logits - float32-cache logits| / max |float32-cache logits| over a prefill
# and 5 teacher-forced decode steps of the tiny models (2 layers); measured (llama /
# gemma2): int8 4.2e-3 / 6.7e-3, e4m3 1.6e-2 / 3.5e-2, e5m2 3.3e-2 / 7.1e-2, float16
# 1.7e-4 / 2.8e-4, bfloat16 1.7e-3 / 3.0e-3
KV_BOUND = {"int8": 1.5e-2, "float8_e4m3fn": 5e-2, "float8_e5m2": 1e-1, "float16": 2e-3,
            "bfloat16": 1.5e-2}


@pytest.mark.parametrize("kv", sorted(KV_BOUND))
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_kv_cache_dtype_logits_stay_close_to_the_float32_cache(models, family, kv):
    if kv in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        pytest.importorskip("ml_dtypes")
    path, cfg, w = models(family)
    ref_model = decoder.Decoder.from_pretrained(path)
    model = decoder.Decoder.from_pretrained(path, kv_cache_dtype=kv)
    assert model.new_caches(1, 4)[0].dtype.name == kv
    rows = [PROMPT[:6], PROMPT[6:8]]
    runs = []
    for m in (ref_model, model):
        caches = m.new_caches(2, 16, block_size=4)
        logits = [m.prefill(rows, caches)]
        for step in range(5):
            logits.append(m.decode_step([PROMPT[9 - step], PROMPT[step]], caches))
        runs.append(np.stack(logits))
    want, got = runs
    # the float32-cache run is itself the oracle's up to float32 rounding
    np.testing.assert_allclose(want[0, 0], oracle_logits(cfg, w, rows[0])[-1], rtol=1e-4,
                               atol=1e-4)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err <= KV_BOUND[kv], err


def test_cli_kv_cache_dtype_int8_generates_the_float32_tokens(models, capsys, monkeypatch):
    path, cfg, w = models("llama")
    seen = []
    new_caches = decoder.Decoder.new_caches

    def spy(self, *a, **kw):
        caches = new_caches(self, *a, **kw)
        seen.append(caches[0].dtype.name)
        return caches

    monkeypatch.setattr(decoder.Decoder, "new_caches", spy)
    args = [str(path), "--prompt-ids", "3,17,5,42", "--max-new-tokens", "6", "--ids-only"]
    f32 = generate.main(args)[0]
    q8 = generate.main(args + ["--kv-cache-dtype", "int8"])[0]
    assert seen == ["float32", "int8"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert [int(t) for t in last.split()] == q8
    assert q8[:4] == f32[:4]  # greedy tokens of the int8 cache: the float32 cache's
    with pytest.raises(SystemExit):
        generate.main(args + ["--kv-cache-dtype", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kv_cache_dtype: int8 caches with float64"):
        decoder.Decoder.from_pretrained(path, dtype=np.float64, kv_cache_dtype="int8")
