"""Decode-kernel edges, drawn by hypothesis and checked against numba_attn.reference in a
child process (run by tests/test_decode_edges.py; ``python tests/decode_edge_cases.py
decode_edges --examples N`` by hand).

The split-KV decode kernel (numba_attn/cpu/decode.py) has separate paths at every edge
drawn here: key tiles of TILE = 32 keys scored four keys at a time (lengths around
multiples of 4 and 32, the last key repeated), splits of >= 512 keys (around 1024 and
2048 keys the kernel picks another number of splits), query rows in blocks of four per kv
head and a one-row tail (GQA groups 1..8, 1 or 2 queries per row), softmax state in
vectors across rows with masked tails (rows per item not a multiple of the lane count),
head_dim and head_dim_v not multiples of the vector width (masked loads), paged caches
whose pages end inside a tile, and every cache dtype. The check is property_cases'
kvcache check (each row alone against the float64 oracle, twice-naive-error tolerance).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import property_cases as pc  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TILE_EDGES = [1, 3, 4, 5, 31, 32, 33, 35, 63, 64, 65, 95, 97, 511, 512, 513]
SPLIT_EDGES = [1023, 1024, 1025, 1027, 1535, 2047, 2048, 2049, 2051]


@st.composite
def decode_edge_config(draw):
    hkv = draw(st.sampled_from([1, 2, 3, 8]))
    group = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8]))
    sq = draw(st.sampled_from([1, 1, 2])) if group <= 4 else 1  # still decode-sized
    n_new = draw(st.sampled_from([0, 0, 1, sq]))
    if n_new:
        sq = n_new
    b = draw(st.integers(1, 2))
    lens = [draw(st.sampled_from(TILE_EDGES + SPLIT_EDGES)) for _ in range(b)]
    d = draw(st.sampled_from([16, 24, 100, 128]))
    return dict(
        B=b, H=hkv * group, Hkv=hkv, D=d, Dv=draw(st.sampled_from([d, d, 48, 72])),
        lens=lens, n_new=n_new, Sq=sq,
        cache_dtype=draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"])),
        kind=draw(st.sampled_from(["contiguous", "paged"])),
        block_size=draw(st.sampled_from([1, 7, 16, 32, 33, 256])),
        causal=draw(st.sampled_from([False, True])),
        window=draw(st.sampled_from([(-1, -1), (-1, -1), (-1, -1), (40, 0)])),
        softcap=0.0, scale=draw(st.sampled_from([None, None, 0.3])),
        alibi=None, bias=None, mask=None,
        sinks=draw(st.sampled_from([False, False, True])),
        seed=draw(st.integers(0, 2**31 - 1)))


pc.OPERATIONS["decode_edges"] = (decode_edge_config(), pc.check_kvcache)

if __name__ == "__main__":
    sys.exit(pc.main())
