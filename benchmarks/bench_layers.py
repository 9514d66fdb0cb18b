"""One decode step of a Llama-3-8B-shaped attention block (MultiHeadAttention + KVCache).

``llama3_8b_decode_4k``: hidden 4096, 32 heads, 8 kv heads, head_dim 128, rotary
(theta 500000), one new token attending to a 4096-token cache, float32, batch 1.
``tiny_decode_256`` is the suite test's smoke shape.

Methods time the whole step and its two halves: the four projections (q, k, v, o GEMVs
through numpy's BLAS) and the attention (rotary + append + attention over the cache,
``attention_with_kvcache``). ``track_tokens_per_s_32_layers`` turns the step into tokens/s
of a 32-layer stack of such blocks (attention blocks only, no MLP).

Run as a script for the split and a measured 32-layer stack (32 caches, shared weights)::

    python benchmarks/bench_layers.py [--layers 32] [--repeat 20]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

try:
    from .common import Benchmark
except ImportError:  # run as a script
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import Benchmark

import numba_attn
from numba_attn.layers import linear

# name: (hidden, heads, kv heads, cache length)
SHAPES = {"tiny_decode_256": (256, 8, 2, 256),
          "llama3_8b_decode_4k": (4096, 32, 8, 4096)}


def build(shape, rng, n_caches=1):
    """(layer, caches, x) with caches holding ``cache_len`` random tokens each."""
    hidden, h, hkv, n = SHAPES[shape]
    layer = numba_attn.MultiHeadAttention(hidden, h, hkv, rope_theta=500000.0,
                                          seed=int(rng.integers(2**31)))
    caches = []
    for _ in range(n_caches):
        c = numba_attn.KVCache(1, n + 8, hkv, layer.head_dim)
        c.k[:, :n] = rng.standard_normal((1, n, hkv, layer.head_dim), dtype=np.float32)
        c.v[:, :n] = rng.standard_normal((1, n, hkv, layer.head_dim), dtype=np.float32)
        c.seqlens = np.array([n])
        caches.append(c)
    x = rng.standard_normal((1, 1, hidden), dtype=np.float32)
    return layer, caches, x


def parts(layer, cache, x, n):
    """(step, projections, attention) callables; each resets the cache to ``n`` tokens."""
    hd, h, hkv = layer.head_dim, layer.num_heads, layer.num_kv_heads
    cos, sin = layer._rope.get(n + 8)
    q = np.ascontiguousarray(linear(x, layer.w_q).reshape(1, 1, h, hd))
    k = np.ascontiguousarray(linear(x, layer.w_k).reshape(1, 1, hkv, hd))
    v = np.ascontiguousarray(linear(x, layer.w_v).reshape(1, 1, hkv, hd))
    o = np.zeros((1, 1, h * hd), np.float32)
    cfg = layer.config

    def step():
        cache.seqlens[:] = n
        return layer(x, cache=cache)

    def projections():
        return (linear(x, layer.w_q), linear(x, layer.w_k), linear(x, layer.w_v),
                linear(o, layer.w_o))

    def attention():
        cache.seqlens[:] = n
        return numba_attn.attention_with_kvcache(
            q, cache, k, v, rotary_cos=cos, rotary_sin=sin, causal=True,
            window=cfg.window, scale=cfg.scale)

    return step, projections, attention


class LayerDecode(Benchmark):
    """One new token through one attention block with a KV cache, float32, batch 1."""

    params = [list(SHAPES)]
    param_names = ["shape"]
    test_params = ("tiny_decode_256",)

    def make(self, shape):
        layer, (cache,), x = build(shape, self.rng)
        self.step, self.proj, self.attn = parts(layer, cache, x, SHAPES[shape][3])
        self.proj()
        self.attn()
        return self.step

    def time_decode_step(self, shape):
        self.fn()

    def time_projections(self, shape):
        self.proj()

    def time_attention(self, shape):
        self.attn()

    def peakmem_decode_step(self, shape):
        self.fn()

    def track_tokens_per_s_32_layers(self, shape):
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            self.fn()
            ts.append(time.perf_counter() - t0)
        return 1.0 / (32 * float(np.median(ts)))

    track_tokens_per_s_32_layers.unit = "tokens/s"


# name: (hidden, heads, q_lora_rank, kv_lora_rank, nope, rope, v, cache length)
MLA_SHAPES = {"tiny_mla_decode_256": (256, 4, None, 64, 32, 16, 32, 256),
              "deepseek_v2_lite_decode_4k": (2048, 16, None, 512, 128, 64, 128, 4096)}


class MLADecode(Benchmark):
    """One new token through multi-head latent attention: absorbed form over an MLACache
    (576 floats per token) versus the naive form's per-head keys/values."""

    params = [list(MLA_SHAPES)]
    param_names = ["shape"]
    test_params = ("tiny_mla_decode_256",)

    def make(self, shape):
        hidden, h, ql, r, dn, dr, dv, n = MLA_SHAPES[shape]
        layer = numba_attn.MultiHeadLatentAttention(
            hidden, h, q_lora_rank=ql, kv_lora_rank=r, qk_nope_head_dim=dn,
            qk_rope_head_dim=dr, v_head_dim=dv, seed=int(self.rng.integers(2**31)))
        cache = layer.new_cache(1, n + 8)
        cache.kv[:, :n] = self.rng.standard_normal((1, n, 1, r + dr), dtype=np.float32)
        x = self.rng.standard_normal((1, 1, hidden), dtype=np.float32)

        def step():
            cache.seqlens[:] = n
            return layer(x, cache=cache)

        return step

    def time_decode_step(self, shape):
        self.fn()

    def peakmem_decode_step(self, shape):
        self.fn()


def _median_ms(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3_8b_decode_4k", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    import numba

    rng = np.random.default_rng(20240601)
    n = SHAPES[args.shape][3]
    layer, caches, x = build(args.shape, rng, n_caches=args.layers)
    step, proj, attn = parts(layer, caches[0], x, n)
    for f in (step, proj, attn):
        f()
    t_step, t_proj, t_attn = (_median_ms(f, args.repeat) for f in (step, proj, attn))
    print(f"{args.shape}: hidden {SHAPES[args.shape][0]}, cache {n}, float32, "
          f"{numba.get_num_threads()} numba threads")
    print(f"  one block      {t_step:8.3f} ms")
    print(f"  projections    {t_proj:8.3f} ms  ({100 * t_proj / t_step:4.1f} %)")
    print(f"  attention      {t_attn:8.3f} ms  ({100 * t_attn / t_step:4.1f} %)  "
          f"(rotary + append + attention over the cache)")
    print(f"  other          {t_step - t_proj - t_attn:8.3f} ms  (reshapes, checks)")

    def stack():
        for c in caches:
            c.seqlens[:] = n
        h = x
        for c in caches:  # attention blocks only, weights shared, one cache per layer
            h = layer(h, cache=c)
        return h

    stack()
    t_stack = _median_ms(stack, max(3, args.repeat // 4))
    print(f"  {args.layers}-layer stack {t_stack:8.1f} ms per token = "
          f"{1e3 / t_stack:6.2f} tokens/s (estimate from one block: "
          f"{1e3 / (args.layers * t_step):6.2f})")


if __name__ == "__main__":
    main()
