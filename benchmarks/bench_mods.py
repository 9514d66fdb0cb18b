"""User mods (numba_attn.mods): block-sparse document masks and a relative-position score_mod.

* ``DocMask``: 16 documents packed in S (causal within each document, about 6 % of the
  causal square visible at S = 8192), B=1, H=16, D=64, float32. ``block_mask`` is
  ``attention(block_mask=create_block_mask(...))`` (the block mask built once, outside the
  timed call); ``dense_causal`` numba_attn's own plain causal call (the aim: block_mask
  proportional to the visible tiles); ``torch_sdpa`` torch SDPA given the same boolean mask.
* ``RelPos``: a T5-style bucketed relative-position bias through ``score_mod`` against the
  plain causal call (aim: <= 1.3x), B=1, H=16, D=64.
"""
from __future__ import annotations

import math

import numba
import numpy as np

import numba_attn

from .common import Benchmark, require_torch

H, D = 16, 64


def same_doc_causal(b, h, i, j, doc):
    return doc[b, i] == doc[b, j] and j <= i


@numba.njit
def _bucket(rel, n, max_dist):
    half = n // 2
    ret = half if rel > 0 else 0
    r = abs(rel)
    exact = half // 2
    if r < exact:
        return ret + r
    big = exact + int(math.log(r / exact) / math.log(max_dist / exact) * (half - exact))
    return ret + min(big, half - 1)


def t5_bias(score, b, h, i, j, table):
    return score + table[h, _bucket(j - i, table.shape[1], 128)]


def _qkv(rng, s):
    return tuple(rng.standard_normal((1, s, H, D), dtype=np.float32) for _ in range(3))


class DocMask(Benchmark):
    params = [[1024, 8192], ["block_mask", "dense_causal", "torch_sdpa"]]
    param_names = ["seqlen", "impl"]

    def make(self, s, impl):
        q, k, v = _qkv(self.rng, s)
        doc = np.repeat(np.arange(16), s // 16)[None]
        if impl == "block_mask":
            bm = numba_attn.create_block_mask(same_doc_causal, 1, 1, s, s, mask_mod_args=(doc,))
            return lambda: numba_attn.attention(q, k, v, block_mask=bm)
        if impl == "dense_causal":
            return lambda: numba_attn.attention(q, k, v, causal=True)
        if impl == "torch_sdpa":
            torch = require_torch()
            d = doc[0]
            mask = torch.from_numpy((d[:, None] == d[None, :]) & np.tri(s, dtype=bool))
            tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            return lambda: sdpa(tq, tk, tv, attn_mask=mask)
        raise NotImplementedError(impl)

    def time_attention(self, s, impl):
        self.fn()


class RelPos(Benchmark):
    params = [[512, 2048], ["score_mod", "plain"]]
    param_names = ["seqlen", "impl"]

    def make(self, s, impl):
        q, k, v = _qkv(self.rng, s)
        table = self.rng.standard_normal((H, 32)).astype(np.float32)
        if impl == "score_mod":
            return lambda: numba_attn.attention(q, k, v, causal=True, score_mod=t5_bias,
                                                score_mod_args=(table,))
        if impl == "plain":
            return lambda: numba_attn.attention(q, k, v, causal=True)
        raise NotImplementedError(impl)

    def time_attention(self, s, impl):
        self.fn()
