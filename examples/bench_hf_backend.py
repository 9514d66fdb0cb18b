"""A Llama-3.2-1B-shaped Hugging Face model on the CPU: attn_implementation="numba_attn" vs
"sdpa", in the same run, on the same model (random weights, float32).

Shape (Llama-3.2-1B): hidden 2048, 32 query heads, 8 kv heads, head_dim 64, MLP 8192, vocab
128256 (tied), rope theta 500000; ``--layers`` (default 16) decoder layers.

* prefill: one forward over ``--prefill`` tokens (default 2048), logits of the last token.
* decode: one new token over a ``--context``-token cache (default 4096: 4095 cached + 1);
  the cache is filled with random keys/values (a decode step's cost does not depend on
  them), cropped back after every step.

Each implementation is registered twice through transformers' AttentionInterface: as itself
and wrapped in a timer, so the report gives the whole model's time and the time spent inside
the attention function (the only part that differs). Both get the same masks (HF's SDPA
mask builder). Repeats interleave the two; best of ``--repeat`` for the model and for
attention separately, after a warm-up (Numba compiles are never timed). Numba's threading
layer is printed: ``register()`` picks workqueue (see its docstring)::

    pip install "numba_attn[hf]"
    python examples/bench_hf_backend.py [--layers 16] [--prefill 2048] [--context 4096]
                                        [--threads N] [--vocab V] [--skip-prefill]
"""
from __future__ import annotations

import argparse
import inspect
import time

import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from numba_attn.integrations import transformers as nt

SPENT: dict = {}


def timed(name, fn):
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] = SPENT.get(name, 0.0) + time.perf_counter() - t0
    return run


IMPLS = {"sdpa": sdpa_attention_forward, "numba_attn": nt.attention_forward}


def register():
    nt.register()
    for name, fn in IMPLS.items():
        AttentionInterface.register(f"timed_{name}", timed(name, fn))
        AttentionMaskInterface.register(f"timed_{name}", sdpa_mask)


def build(layers, vocab):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.float().eval()


def cache_kw(model):
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def filled_cache(model, length):
    cfg = model.config
    cache = transformers.DynamicCache(config=cfg)
    g = torch.Generator().manual_seed(1)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, length, cfg.head_dim, generator=g)
        v = torch.randn(1, cfg.num_key_value_heads, length, cfg.head_dim, generator=g)
        cache.update(k, v, layer)
    return cache


def once(fn, name):
    """(total seconds, seconds inside the attention function) of one call of ``fn``."""
    SPENT.pop(name, None)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, SPENT.get(name, 0.0)


def _numba_threads():
    import numba

    return numba.get_num_threads()


def _layer():
    import numba

    try:
        return numba.threading_layer() + " layer"
    except ValueError:
        return f"layer {numba.config.THREADING_LAYER!r} requested"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="decode steps per repeat")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both torch and Numba (default: as configured)")
    args = ap.parse_args()
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)

    register()
    model = build(args.layers, args.vocab)
    ckw = cache_kw(model)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, args.vocab, (1, args.prefill), generator=g)
    token = torch.randint(0, args.vocab, (1, 1), generator=g)
    cache = filled_cache(model, args.context - 1)
    pos = torch.tensor([[args.context - 1]])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} torch threads, {_numba_threads()} Numba threads; "
          f"Llama-3.2-1B shape, {args.layers} layers, float32")

    def prefill():
        with torch.no_grad():
            model(prompt, logits_to_keep=1, use_cache=False)

    def decode():
        with torch.no_grad():
            for _ in range(args.steps):
                model(token, position_ids=pos, logits_to_keep=1, use_cache=True,
                      **{ckw: cache})
                cache.crop(-1)  # back to context - 1 cached tokens

    for name in IMPLS:  # warm-up: Numba's compiles, torch's first-call costs
        model.set_attn_implementation(f"timed_{name}")
        with torch.no_grad():
            model(prompt[:, :64], logits_to_keep=1, use_cache=False)
            decode()
    # repeats interleaved (sdpa, numba_attn, sdpa, ...) so a load change on this shared
    # machine hits both; best of the repeats
    rows = {}
    phases = ([] if args.skip_prefill else [("prefill", prefill, 1)]) + [
        ("decode", decode, args.steps)]
    for _ in range(args.repeat):
        for key, fn, per in phases:
            for name in IMPLS:
                model.set_attn_implementation(f"timed_{name}")
                tot, att = once(fn, name)
                old = rows.get((name, key), (float("inf"), float("inf")))
                rows[name, key] = min(old[0], tot / per), min(old[1], att / per)

    labels = {"prefill": f"prefill {args.prefill}", "decode": f"decode @{args.context} (per token)"}
    print(f"{'':28s} {'model sdpa':>11s} {'model numba':>12s} {'ratio':>6s}   "
          f"{'attn sdpa':>10s} {'attn numba':>11s} {'ratio':>6s}")
    for key, _, _ in phases:
        label = labels[key]
        (ts, as_), (tn, an) = rows["sdpa", key], rows["numba_attn", key]
        print(f"{label:28s} {ts * 1e3:9.1f}ms {tn * 1e3:10.1f}ms {ts / tn:5.2f}x   "
              f"{as_ * 1e3:8.1f}ms {an * 1e3:9.1f}ms {as_ / an:5.2f}x")
    print("ratio = sdpa time / numba_attn time (> 1: numba_attn faster); Numba's "
          f"threading: {_layer()}")


if __name__ == "__main__":
    main()
