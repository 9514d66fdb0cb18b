"""KV-cache append and page copy on the GPU (twins of :mod:`numba_attn.cpu.cache_ops`).

One thread per copied element: an append touches only the new tokens' slots
(O(tokens x heads x head_dim), whatever the cache length).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from . import bf16 as bfm
from . import quant as cq

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


_QUANTIZERS = {}


def _quantizer(code, bf16):
    """The append kernel of an 8-bit cache (cached per storage code and bfloat16 input):
    one thread per (token, kv head) quantizes its row as numba_attn.quant.quantize."""
    key = (code, bf16)
    if key not in _QUANTIZERS:
        ENC = cq.encoder(code)
        QMAX = np.float32(cq.QMAX[code])
        LOAD = bfm.loader(bf16, np.float32)

        @cuda.jit
        def append_quantized(store, scales, slots, new):
            """store (N, Hkv, D) int8 or float8 bits, scales (N, Hkv) float32, slots (T,)
            int64, new (T, Hkv, D) floats: row t -> store[slots[t]], its scale beside."""
            i = cuda.grid(1)
            n_h, d = new.shape[1], new.shape[2]
            if i < new.shape[0] * n_h:
                t = i // n_h
                h = i % n_h
                amax = numba.float32(0.0)
                for c in range(d):
                    amax = max(amax, abs(numba.float32(LOAD(new[t, h, c]))))
                s = numba.float32(amax / QMAX)
                scales[slots[t], h] = s
                safe = s if s > numba.float32(0.0) else numba.float32(1.0)
                for c in range(d):
                    y = numba.float32(numba.float32(LOAD(new[t, h, c])) / safe)
                    store[slots[t], h, c] = ENC(min(max(y, -QMAX), QMAX))

        _QUANTIZERS[key] = append_quantized
    return _QUANTIZERS[key]


def append_quantized(store, scales, slots, new, n, dtype):
    """Launch helper: quantize ``n`` tokens of ``new`` (float32 / float16 / float64 or
    bfloat16, any leading shape, C-contiguous) into 8-bit ``store`` of ``dtype``."""
    code = cq.code_of(dtype)
    bf16 = bfm.is_bf16(new.dtype)
    new3 = bfm.bits(new).reshape(n, store.shape[1], store.shape[2])
    if n:
        blocks, threads = _grid(n * store.shape[1])
        _quantizer(code, bf16)[blocks, threads](cq.raw(store), scales, slots, new3)


def _grid(n):
    return max(1, -(-int(n) // THREADS)), THREADS


def append_rows(store, slots, new, n):
    """Launch helper: ``new`` holds ``n`` tokens (any leading shape, C-contiguous).

    bfloat16 storage and tokens are copied as their uint16 bits (float8 as uint8)."""
    store, new = cq.raw(bfm.bits(store)), cq.raw(bfm.bits(new))
    new3 = new.reshape(n, store.shape[1], store.shape[2])
    if n:
        blocks, threads = _grid(new3.size)
        _append_rows[blocks, threads](store, slots, new3)


def copy_page(pages, src, dst):
    """pages (num_blocks, block_size, Hkv, D): pages[dst] = pages[src] (any dtype: bits)."""
    pages = cq.raw(bfm.bits(pages))
    blocks, threads = _grid(pages.shape[1] * pages.shape[2] * pages.shape[3])
    _copy_page[blocks, threads](pages, int(src), int(dst))
