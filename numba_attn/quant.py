"""8-bit KV-cache storage: symmetric int8 or float8_e4m3fn values with a float32 scale
per (position, kv head).

A key (or value) row ``x`` of ``head_dim`` values for one kv head is stored as
``q = rint(x / s)`` (round half to even) in int8 with ``s = max|x| / 127`` in float32, so
``x ~= s * q`` with ``|x - s * q| <= s / 2``; an all-zero row stores ``s = 0`` (and zeros).
``ml_dtypes.float8_e4m3fn`` storage uses ``s = max|x| / 448`` (its largest finite value)
and ``q = float8(x / s)`` (round to nearest even: 3 mantissa bits, relative error
<= 2**-4 per value, subnormals below 2**-6); ``ml_dtypes.float8_e5m2`` uses
``s = max|x| / 57344`` (2 mantissa bits: relative error <= 2**-3).
The decode kernel reads ``q`` and ``s`` and dequantizes in registers: the score of key
``j`` is ``s_k[j] * (q_row . k_int8[j])`` and ``p_j * s_v[j]`` multiplies ``v_int8[j]``.
Calls the decode kernel does not serve (more query rows per kv head, user mods, the
reference backend) attend over float32 copies of the rows they read
(:func:`dequantized`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

QMAX = {np.dtype(np.int8): 127.0}  # storage dtype -> largest stored magnitude
try:
    import ml_dtypes

    QMAX[np.dtype(ml_dtypes.float8_e4m3fn)] = 448.0
    QMAX[np.dtype(ml_dtypes.float8_e5m2)] = 57344.0
except ImportError:  # fp8 caches need ml_dtypes
    pass
QUANTIZED = tuple(QMAX)


def is_quantized(dt) -> bool:
    """True for the 8-bit storage dtypes (int8; float8_e4m3fn, float8_e5m2 with ml_dtypes)."""
    return isinstance(dt, np.dtype) and dt in QMAX


def quantize(x, dtype=np.int8):
    """float array (..., D) -> (8-bit values (..., D) of ``dtype``, float32 scales (...)).

    Scale = max|x| / QMAX[dtype] over the last axis (float32); int8 values rint(x / scale)
    clipped to [-127, 127], float8_e4m3fn values x / scale clipped to [-448, 448] and
    rounded to nearest even; an all-zero row gets scale 0 and zeros.
    """
    dtype = np.dtype(dtype)
    qmax = np.float32(QMAX[dtype])
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    scale = (amax / qmax).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))[..., None]
    y = np.clip(x / safe, -qmax, qmax)
    q = np.rint(y).astype(np.int8) if dtype == np.int8 else y.astype(dtype)
    return q, scale


def dequantize(q, scale):
    """8-bit values (..., D) and scales (...) -> float32 values."""
    return q.astype(np.float32) * np.asarray(scale, np.float32)[..., None]


def dequantized(p):
    """A copy of Problem ``p`` whose k/v are float32 host arrays: every storage row some
    batch row reads (``p.extra["kv_scales"]``) dequantized, the rest zero (calloc,
    untouched); device storage is copied to the host first."""
    ksc, vsc = (a.copy_to_host() if hasattr(a, "copy_to_host") else a
                for a in p.extra["kv_scales"])
    pk, pv = (a.copy_to_host() if hasattr(a, "copy_to_host") else a for a in (p.k, p.v))
    k = np.zeros(p.k.shape, np.float32)
    v = np.zeros(p.v.shape, np.float32)
    bs = p.block_size
    for b in range(p.batch):
        k0, klen = int(p.rows[b, 2]), max(int(p.rows[b, 3]), 0)
        if klen == 0:
            continue
        for blk in range(-(-klen // bs)):
            n = min(bs, klen - blk * bs)
            s = k0 + int(p.block_table[b, blk]) * bs
            k[s:s + n] = dequantize(pk[s:s + n], ksc[s:s + n])
            v[s:s + n] = dequantize(pv[s:s + n], vsc[s:s + n])
    extra = {key: val for key, val in p.extra.items() if key != "kv_scales"}
    return dataclasses.replace(p, k=k, v=v, extra=extra)
