"""Decoding over a KV cache, and the cost of appending one token.

Shapes are the decode rows of :data:`numba_attn.bench.SHAPES` (the table of ``python -m
numba_attn bench``): Llama-3-8B attention (H=32, Hkv=8, D=128), one float32 query over a
cache of 4096 or 16384 keys, float32, float16 / bfloat16, int8 or float8_e4m3fn storage, and the 4k step right
after a numpy matmul (``..._after_matmul``: the matmul runs in asv's ``setup`` of each
sample, so numpy's BLAS workers are still spinning when the sample starts).

``cache`` is a contiguous :class:`numba_attn.KVCache` or a :class:`numba_attn.PagedKVCache`
with 16-token pages. The torch peer is ``scaled_dot_product_attention(enable_gqa=True)``
on the valid prefix as BHSD arrays (contiguous float32 only; numba's thread count for
both). ``track_kv_gbs`` is bytes of K and V read per second; ``track_time_over_stream``
divides the decode time by the time to stream-read the same bytes with the same vector
loads and threads (:func:`numba_attn.bench.stream_read_seconds`): 1 is the memory limit.

``Append`` times :meth:`KVCache.append` of one token at cache lengths 1k and 64k: it
should not depend on the length (O(num_kv_heads x head_dim) per token).
"""
from __future__ import annotations

import numpy as np

import numba_attn
from numba_attn import bench as nb

from .common import Benchmark, require_torch

H, HKV, D = 32, 8, 128
SHAPES = {s.name: s for s in nb.SHAPES if s.kind == "decode"}
CACHES = ["contiguous", "paged16"]


def make_cache(kind, batch, length, k, v, dtype=None):
    """A cache of ``kind`` (``dtype``, default k's) holding k, v (batch, length, HKV, D)
    in every row."""
    dtype = k.dtype if dtype is None else dtype
    if kind == "contiguous":
        cache = numba_attn.KVCache(batch, length, HKV, D, dtype=dtype)
    else:
        cache = numba_attn.PagedKVCache(batch, batch * -(-length // 16), 16, HKV, D,
                                        dtype, max_seqlen=length)
    cache.append(k, v)
    return cache


class Decode(Benchmark):
    """One decoding step (attention over the whole cache, no append) per sample."""

    params = [list(SHAPES), CACHES, ["numba_attn", "torch"]]
    param_names = ["shape", "cache", "impl"]
    number = 1  # one call per sample, right after setup (and its matmul, where asked)

    def make(self, shape, cache_kind, impl):
        s = SHAPES[shape]
        self.q, k, v = nb.make_inputs(s, seed=self.rng)
        self.k, self.v = nb.stored(s, k, v)  # what the cache holds (int8: quantized)
        self.kv_bytes = nb.kv_bytes(s)
        self.before = nb.numba_attn_call(s, self.q, k, v).before
        if impl == "torch":
            require_torch()
            why = nb.peer_shape_reason(s)
            if why or cache_kind != "contiguous":
                raise NotImplementedError(why or "torch peer: reads a contiguous prefix only")
            return nb.torch_peer(s, self.q, k, v)
        cdt = nb.storage_dtype(s)
        cache = make_cache(cache_kind, s.batch, s.seqlen_k, k, v,
                           cdt if cdt.itemsize == 1 else None)
        q = self.q
        return lambda: numba_attn.attention_with_kvcache(q, cache)

    def setup(self, *params):
        super().setup(*params)
        if self.before is not None:
            self.before()

    def time_decode(self, shape, cache_kind, impl):
        self.fn()

    def peakmem_decode(self, shape, cache_kind, impl):
        self.fn()

    def track_kv_gbs(self, shape, cache_kind, impl):
        return self.kv_bytes / nb.best_seconds(self.fn) / 1e9

    track_kv_gbs.unit = "GB/s"

    def track_time_over_stream(self, shape, cache_kind, impl):
        return nb.best_seconds(self.fn) / nb.stream_read_seconds(self.k, self.v)

    track_time_over_stream.unit = "ratio"


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
