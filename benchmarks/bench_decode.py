"""Decoding over a KV cache, and the cost of appending one token.

Shapes are Llama-3-8B attention (H=32, Hkv=8, D=128, float32), one query per sequence:

* ``llama3_8b_decode_4k`` / ``llama3_8b_decode_16k``: batch 1, cache of 4096 / 16384 keys
* ``llama3_8b_decode_4k_b8`` / ``llama3_8b_decode_16k_b8``: the same for 8 sequences

``cache`` is a contiguous :class:`numba_attn.KVCache` or a :class:`numba_attn.PagedKVCache`
with 16-token pages. The torch peer is ``scaled_dot_product_attention(enable_gqa=True)``
on the valid prefix as BHSD arrays (contiguous only; numba's thread count for both).
``track_kv_gbs`` is bytes of K and V read per second; ``track_fraction_of_read_bandwidth``
divides it by the machine's streaming read bandwidth measured in the same setup
(:func:`numba_attn.bench.read_bandwidth_gbs`).

``Append`` times :meth:`KVCache.append` of one token at cache lengths 1k and 64k: it
should not depend on the length (O(num_kv_heads x head_dim) per token).
"""
from __future__ import annotations

import numpy as np

import numba_attn
from numba_attn import bench as nb

from .common import Benchmark, require_torch

H, HKV, D = 32, 8, 128
SHAPES = {"llama3_8b_decode_4k": (1, 4096), "llama3_8b_decode_4k_b8": (8, 4096),
          "llama3_8b_decode_16k": (1, 16384), "llama3_8b_decode_16k_b8": (8, 16384)}
CACHES = ["contiguous", "paged16"]


def make_cache(kind, batch, length, k, v):
    """A cache of ``kind`` holding k, v (batch, length, HKV, D) in every row."""
    if kind == "contiguous":
        cache = numba_attn.KVCache(batch, length, HKV, D)
    else:
        cache = numba_attn.PagedKVCache(batch, batch * -(-length // 16), 16, HKV, D,
                                        max_seqlen=length)
    cache.append(k, v)
    return cache


class Decode(Benchmark):
    """One decoding step (attention over the whole cache, no append) per sample."""

    params = [list(SHAPES), CACHES, ["numba_attn", "torch"]]
    param_names = ["shape", "cache", "impl"]

    def make(self, shape, cache_kind, impl):
        batch, length = SHAPES[shape]
        self.q = self.rng.standard_normal((batch, 1, H, D), dtype=np.float32)
        k = self.rng.standard_normal((batch, length, HKV, D), dtype=np.float32)
        v = self.rng.standard_normal((batch, length, HKV, D), dtype=np.float32)
        self.kv_bytes = k.nbytes + v.nbytes
        if impl == "torch":
            require_torch()
            if cache_kind != "contiguous":
                raise NotImplementedError("torch peer: reads a contiguous prefix only")
            return nb.torch_peer(nb.Shape(shape, batch, 1, length, H, HKV, D, False,
                                          "decode"), self.q, k, v)
        cache = make_cache(cache_kind, batch, length, k, v)
        q = self.q
        return lambda: numba_attn.attention_with_kvcache(q, cache)

    def time_decode(self, shape, cache_kind, impl):
        self.fn()

    def peakmem_decode(self, shape, cache_kind, impl):
        self.fn()

    def track_kv_gbs(self, shape, cache_kind, impl):
        return self.kv_bytes / nb.best_seconds(self.fn) / 1e9

    track_kv_gbs.unit = "GB/s"

    def track_fraction_of_read_bandwidth(self, shape, cache_kind, impl):
        gbs = self.kv_bytes / nb.best_seconds(self.fn) / 1e9
        return gbs / nb.read_bandwidth_gbs(nbytes=256 * 2**20)

    track_fraction_of_read_bandwidth.unit = "ratio"


class Append(Benchmark):
    """Append one token (k and v) to one sequence holding ``length`` tokens.

    Each sample also sets ``seqlens`` back (O(batch)), so every sample appends at the
    same position.
    """

    params = [[1024, 65536], CACHES]
    param_names = ["length", "cache"]

    def make(self, length, cache_kind):
        cap = length + 16
        if cache_kind == "contiguous":
            cache = numba_attn.KVCache(1, cap, HKV, D)
        else:
            cache = numba_attn.PagedKVCache(1, -(-cap // 16), 16, HKV, D, max_seqlen=cap)
        cache.seqlens = [length]  # the contents are never read here
        k1 = self.rng.standard_normal((1, 1, HKV, D), dtype=np.float32)
        base = np.array([length], np.int32)

        def append():
            cache.append(k1, k1)
            cache.seqlens = base
        return append

    def time_append(self, length, cache_kind):
        self.fn()

    def peakmem_append(self, length, cache_kind):
        self.fn()
