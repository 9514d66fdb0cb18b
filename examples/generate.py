"""Generate text with a Hugging Face decoder checkpoint in numpy + numba_attn (no torch).

::

    python examples/generate.py MODEL_DIR (--prompt TEXT | --prompt-ids 1,2,3)
        [--max-new-tokens N] [--greedy | --temperature T --top-p P --top-k K --seed S]
        [--ids-only] [--batch-file F] [--kv-cache-dtype {float32,bfloat16,float16,int8,
        float8_e4m3fn,float8_e5m2}]

MODEL_DIR holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), plus ``tokenizer.json`` for text prompts and output
(read with the ``tokenizers`` package). Families: Llama (3.x rope scaling), Mistral
(sliding window), Qwen2 (q/k/v bias, tied embeddings), Qwen3 (QK-norm) and Gemma-2 (logit
softcaps, alternating sliding/global layers); see ``examples/decoder.py``. bfloat16
checkpoints keep their matrices in bfloat16 (float32 compute) when ml_dtypes is installed.

Decoding is greedy unless ``--temperature`` is given. Without ``--ids-only`` the text
streams as it is generated and a tokens/s line ends the output; with ``--ids-only`` each
prompt's generated ids are printed, space separated, one line per prompt (so the last line
printed holds the ids of the last prompt).

``--batch-file F`` adds the non-empty lines of F to the batch, after the prompt given on
the command line, each line in the same form as that prompt (text with ``--prompt``,
comma-separated ids with ``--prompt-ids``). All prompts generate together in one paged KV
cache per layer (a ragged batch).

``--kv-cache-dtype`` picks the caches' storage (default float32, the compute dtype):
bfloat16 / float16 halve the bytes a decode step reads (converted in registers);
int8, float8_e4m3fn and float8_e5m2 quarter them (8-bit values with a float32 scale per
token and kv head, quantized on append; on N(0, 1) data one attention step stays within
3e-2 / 8e-2 / 0.2 of max |exact|, so greedy tokens can differ from a float32 cache's at
near-ties).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decoder import Decoder, make_sampler

KV_CACHE_CHOICES = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "float8_e5m2")


def parse_ids(text, where):
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise SystemExit(f"{where}: expected comma-separated token ids like 1,2,3, got "
                         f"{text!r}") from None
    if not ids:
        raise SystemExit(f"{where}: no token ids in {text!r}")
    return ids


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", metavar="MODEL_DIR")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT")
    src.add_argument("--prompt-ids", metavar="1,2,3")
    ap.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    ap.add_argument("--temperature", type=float, metavar="T")
    ap.add_argument("--top-p", type=float, metavar="P")
    ap.add_argument("--top-k", type=int, metavar="K")
    ap.add_argument("--seed", type=int, metavar="S")
    ap.add_argument("--ids-only", action="store_true")
    ap.add_argument("--batch-file", metavar="F")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_CHOICES, default="float32",
                    help="storage of the KV caches (default float32)")
    return ap


def load_tokenizer(model_dir):
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(path))


def eos_ids(model_dir, config):
    """eos_token_id of generation_config.json, else config.json (an int or a list)."""
    gen = Path(model_dir) / "generation_config.json"
    value = None
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
    if value is None:
        value = config.get("eos_token_id")
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    sampling = [o for o, v in (("--temperature", args.temperature), ("--top-p", args.top_p),
                               ("--top-k", args.top_k), ("--seed", args.seed))
                if v is not None]
    if args.greedy and sampling:
        ap.error(f"--greedy cannot be combined with {', '.join(sampling)}")
    if sampling and args.temperature is None:
        ap.error(f"{', '.join(sampling)}: sampling options, they need --temperature T")
    if args.max_new_tokens < 0:
        ap.error("--max-new-tokens must be >= 0")
    tok = load_tokenizer(args.model_dir)
    lines = [args.prompt if args.prompt is not None else args.prompt_ids]
    if args.batch_file:
        if not Path(args.batch_file).is_file():
            ap.error(f"--batch-file: {args.batch_file} is not a file")
        lines += [ln.strip() for ln in Path(args.batch_file).read_text().splitlines()
                  if ln.strip()]
    if args.prompt is not None:
        if tok is None:
            ap.error(f"--prompt needs {Path(args.model_dir) / 'tokenizer.json'} and the "
                     f"tokenizers package; pass --prompt-ids instead")
        prompts = [tok.encode(text).ids for text in lines]
    else:
        prompts = [parse_ids(text, "--prompt-ids" if i == 0 else f"{args.batch_file}, "
                             f"prompt {i}") for i, text in enumerate(lines)]

    try:
        model = Decoder.from_pretrained(args.model_dir, kv_cache_dtype=args.kv_cache_dtype)
    except ValueError as e:  # unsupported model_type, bad or missing tensors / shards
        raise SystemExit(f"{ap.prog}: error: {e}") from None
    vocab = model.vocab
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if not p:
            raise SystemExit(f"{ap.prog}: error: prompt {i} is empty (no tokens)")
        if bad:
            raise SystemExit(f"{ap.prog}: error: prompt {i} has token ids outside [0, "
                             f"{vocab}) (the model's vocab_size): {bad[:5]}")
    sampler = None
    if args.temperature is not None:
        sampler = make_sampler(args.temperature, args.top_k or 0,
                               1.0 if args.top_p is None else args.top_p, args.seed)
    stream = not args.ids_only and len(prompts) == 1
    shown = [""]

    def on_step(new):  # decode the whole continuation, print what is new
        if first_step[0] is None:
            first_step[0] = time.perf_counter()
        if not stream or new[0] is None:
            return
        generated.append(new[0])
        if tok is None:
            print(("" if len(generated) == 1 else " ") + str(new[0]), end="", flush=True)
            return
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

    generated, first_step = [], [None]
    t0 = time.perf_counter()
    out = model.generate(prompts, args.max_new_tokens, sampler=sampler,
                         eos_token_ids=eos_ids(args.model_dir, model.config),
                         on_step=on_step)
    seconds = time.perf_counter() - t0
    if args.ids_only:
        for ids in out:
            print(" ".join(map(str, ids)))
        return out
    if stream:
        print()
    else:
        for i, ids in enumerate(out):
            text = tok.decode(ids) if tok is not None else " ".join(map(str, ids))
            print(f"[{i}] {text}")
    n = sum(len(ids) for ids in out)
    steps = max((len(ids) for ids in out), default=0)
    prefill = (first_step[0] or t0) - t0
    decode = seconds - prefill
    rate = f", then {(steps - 1) / decode:.1f} steps/s" if steps > 1 and decode > 0 else ""
    print(f"{n} tokens in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} tokens/s (prefill "
          f"of {sum(map(len, prompts))} prompt tokens {prefill:.2f} s{rate})")
    return out


if __name__ == "__main__":
    main()
