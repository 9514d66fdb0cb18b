"""KV-cache append and page copy on the GPU (twins of :mod:`numba_attn.cpu.cache_ops`).

One thread per copied element: an append touches only the new tokens' slots
(O(tokens x heads x head_dim), whatever the cache length).
"""
from __future__ import annotations

from numba import cuda

from . import bf16 as bfm

THREADS = 128


@cuda.jit
def _append_rows(store, slots, new):
    """store (N, Hkv, D), slots (T,) int64, new (T, Hkv, D): store[slots[t]] = new[t]."""
    i = cuda.grid(1)
    n_h, d = new.shape[1], new.shape[2]
    if i < new.shape[0] * n_h * d:
        t = i // (n_h * d)
        h = (i // d) % n_h
        c = i % d
        store[slots[t], h, c] = new[t, h, c]


@cuda.jit
def _copy_page(pages, src, dst):
    """pages (num_blocks, block_size, Hkv, D): pages[dst] = pages[src]."""
    i = cuda.grid(1)
    bs, n_h, d = pages.shape[1], pages.shape[2], pages.shape[3]
    if i < bs * n_h * d:
        s = i // (n_h * d)
        h = (i // d) % n_h
        c = i % d
        pages[dst, s, h, c] = pages[src, s, h, c]


def _grid(n):
    return max(1, -(-int(n) // THREADS)), THREADS


def append_rows(store, slots, new, n):
    """Launch helper: ``new`` holds ``n`` tokens (any leading shape, C-contiguous).

    bfloat16 storage and tokens are copied as their uint16 bits."""
    store, new = bfm.bits(store), bfm.bits(new)
    new3 = new.reshape(n, store.shape[1], store.shape[2])
    if n:
        blocks, threads = _grid(new3.size)
        _append_rows[blocks, threads](store, slots, new3)


def copy_page(pages, src, dst):
    pages = bfm.bits(pages)
    blocks, threads = _grid(pages.shape[1] * pages.shape[2] * pages.shape[3])
    _copy_page[blocks, threads](pages, int(src), int(dst))
