"""Decode tokens/s of a Llama-3.2-1B-shaped decoder with random weights (issue 11's measure).

::

    python examples/bench_decoder.py [--context 1024] [--tokens 16] [--layers 16] [--no-hf]

Writes a random bfloat16 checkpoint of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8
heads, head_dim 64, vocab 128256, tied embeddings) to a temporary directory, then, each
in its own process (so that one model's memory is returned before the next loads):
``examples/decoder.py`` with float32 weights (widened at load) and with bfloat16 weights
(float32 compute), and Hugging Face transformers (torch, SDPA attention) in float32 and
bfloat16 where installed. Every run starts from a KV cache holding ``--context`` random
tokens and times ``--tokens`` greedy decode steps after two warm-up steps; ours also
reports the share of a step spent in attention (``attention_with_kvcache``: rotary,
append, attend) and in projections (q/k/v/o, MLP, lm head GEMVs).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LLAMA_3_2_1B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=128000, eos_token_id=128001,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def write_checkpoint(path, layers, vocab):
    """Random bfloat16 weights (std fan_in ** -0.5; bits truncated from float32)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    cfg = dict(LLAMA_3_2_1B, num_hidden_layers=layers, vocab_size=vocab)
    rng = np.random.default_rng(0)
    e, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * 64, cfg["num_key_value_heads"] * 64
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, e), p + "self_attn.k_proj.weight":
                       (kv, e), p + "self_attn.v_proj.weight": (kv, e),
                       p + "self_attn.o_proj.weight": (e, q), p + "mlp.gate_proj.weight":
                       (inter, e), p + "mlp.up_proj.weight": (inter, e),
                       p + "mlp.down_proj.weight": (e, inter),
                       p + "input_layernorm.weight": (e,),
                       p + "post_attention_layernorm.weight": (e,)})
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            a = np.ones(shape, np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= shape[1] ** -0.5
        tensors[name] = (a.view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)
    save_file(tensors, str(Path(path) / "model.safetensors"))
    (Path(path) / "config.json").write_text(json.dumps(cfg))


def run_ours(path, weights, context, tokens):
    import ml_dtypes

    import numba_attn.kvcache as kvc
    import numba_attn.layers.mha as nl  # the module whose linear MultiHeadAttention calls

    sys.path.insert(0, str(HERE))
    import decoder

    wd = np.float32 if weights == "float32" else ml_dtypes.bfloat16
    t0 = time.perf_counter()
    model = decoder.Decoder.from_pretrained(path, weight_dtype=wd)
    load_s = time.perf_counter() - t0
    caches = model.new_caches(1, context + tokens + 8, block_size=16)
    rng = np.random.default_rng(1)
    for c in caches:
        c.seqlens = [context]
        c.k_pages[...] = rng.standard_normal(c.k_pages.shape, dtype=np.float32)
        c.v_pages[...] = rng.standard_normal(c.v_pages.shape, dtype=np.float32)
    spent = {"attention": 0.0, "projections": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    kvc.attention_with_kvcache = timed(kvc.attention_with_kvcache, "attention")
    nl.linear = decoder.linear = timed(nl.linear, "projections")
    tok = 1
    for _ in range(2):  # warm-up: compiles / loads the kernels
        tok = int(np.argmax(model.decode_step([tok], caches)[0]))
    spent.update(attention=0.0, projections=0.0)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(np.argmax(model.decode_step([tok], caches)[0]))
    step = (time.perf_counter() - t0) / tokens
    return dict(impl="numba_attn", weights=weights, tokens_per_s=1 / step,
                ms_per_token=1e3 * step, attention_share=spent["attention"] / tokens / step,
                projection_share=spent["projections"] / tokens / step, load_s=load_s,
                weight_gib=sum(a.nbytes for a in model.w.values()) / 2**30
                + sum(p.nbytes for layer in model.layers
                      for _, p in layer.attn.named_parameters()) / 2**30)


def run_hf(path, weights, context, tokens):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    dt = torch.float32 if weights == "float32" else torch.bfloat16
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dt, attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    cache = transformers.DynamicCache(config=cfg)
    g = torch.Generator().manual_seed(1)
    for i in range(cfg.num_hidden_layers):
        shape = (1, cfg.num_key_value_heads, context, 64)
        cache.update(torch.randn(shape, generator=g, dtype=dt),
                     torch.randn(shape, generator=g, dtype=dt), i)
    tok, pos = torch.tensor([[1]]), context

    def step():
        nonlocal tok, pos
        out = model(input_ids=tok, past_key_values=cache, use_cache=True,
                    cache_position=torch.tensor([pos]), position_ids=torch.tensor([[pos]]))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        pos += 1

    with torch.inference_mode():
        for _ in range(2):
            step()
        t0 = time.perf_counter()
        for _ in range(tokens):
            step()
        s = (time.perf_counter() - t0) / tokens
    return dict(impl=f"transformers {transformers.__version__} (torch "
                     f"{torch.__version__})", weights=weights, tokens_per_s=1 / s,
                ms_per_token=1e3 * s, load_s=load_s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=LLAMA_3_2_1B["vocab_size"])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "WEIGHTS", "DIR"),
                    help=argparse.SUPPRESS)  # a child process: one measurement
    args = ap.parse_args(argv)
    if args.one:
        impl, weights, path = args.one
        fn = run_ours if impl == "ours" else run_hf
        print(json.dumps(fn(path, weights, args.context, args.tokens)), flush=True)
        return
    hf = not args.no_hf and all(importlib.util.find_spec(m) is not None
                                for m in ("torch", "transformers"))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        write_checkpoint(d, args.layers, args.vocab)
        print(f"# random bfloat16 checkpoint written in {time.perf_counter() - t0:.1f} s",
              flush=True)
        runs = [("ours", "float32"), ("ours", "bfloat16")]
        if hf:
            runs += [("hf", "float32"), ("hf", "bfloat16")]
        results = []
        for impl, weights in runs:
            cmd = [sys.executable, __file__, "--one", impl, weights, d, "--context",
                   str(args.context), "--tokens", str(args.tokens)]
            run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if run.returncode:
                print(f"# {impl} {weights} failed:\n{run.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(run.stdout.strip().splitlines()[-1])
            results.append(res)
            print(json.dumps(res), flush=True)
    print(f"\ncontext {args.context}, {args.tokens} decode steps, {os.cpu_count()} threads")
    for r in results:
        extra = ""
        if "attention_share" in r:
            extra = (f"  attention {100 * r['attention_share']:.0f}%, projections "
                     f"{100 * r['projection_share']:.0f}%, weights {r['weight_gib']:.2f} GiB")
        print(f"{r['impl']:<40} {r['weights']:<9} {r['tokens_per_s']:7.2f} tokens/s "
              f"({r['ms_per_token']:.0f} ms/token){extra}")


if __name__ == "__main__":
    main()
