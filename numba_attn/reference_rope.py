"""Plain numpy float64 oracle of rotary embeddings and of a KV-cache decoding step.

Readable over fast, like :mod:`numba_attn.reference`: the tests compare
:func:`numba_attn.apply_rotary`, :func:`numba_attn.rotary_cos_sin` and
:func:`numba_attn.attention_with_kvcache` with these.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["inv_freq", "rotary_cos_sin", "apply_rotary"]


def inv_freq(rotary_dim, base=10000.0, scaling=None):
    """Frequencies ``base ** (-2i / rotary_dim)``, i < rotary_dim / 2, after ``scaling``.

    ``scaling`` follows Hugging Face's ``rope_scaling``: ``{"rope_type": "linear",
    "factor": f}`` divides every frequency by ``f``; ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`` divides
    long wavelengths by ``factor``, keeps short ones and blends in between.
    """
    freq = 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if not scaling:
        return freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return freq / factor
    # llama3: Hugging Face's _compute_llama3_parameters, written out per frequency
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    out = np.empty_like(freq)
    for i, f in enumerate(freq):
        wavelen = 2.0 * math.pi / f
        if wavelen < old / high:  # high frequency: unchanged
            out[i] = f
        elif wavelen > old / low:  # low frequency: scaled like linear
            out[i] = f / factor
        else:
            smooth = (old / wavelen - low) / (high - low)
            out[i] = (1.0 - smooth) * f / factor + smooth * f
    return out


def rotary_cos_sin(max_position, rotary_dim, base=10000.0, scaling=None):
    """cos, sin float64 tables of shape (max_position, rotary_dim // 2)."""
    ang = np.outer(np.arange(max_position, dtype=np.float64), inv_freq(rotary_dim, base,
                                                                       scaling))
    return np.cos(ang), np.sin(ang)


def apply_rotary(x, cos, sin, positions, interleaved=False):
    """Rotate ``x`` (T, H, D) at integer ``positions`` (T,); float64 result.

    Half-split (GPT-NeoX): pairs ``(x[i], x[i + R/2])``; interleaved (GPT-J): pairs
    ``(x[2i], x[2i + 1])``; each pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``
    with the angle of frequency ``i``. Channels past ``R = 2 * cos.shape[1]`` pass through.
    """
    x = np.array(x, dtype=np.float64)
    r2 = cos.shape[1]
    c = np.asarray(cos, np.float64)[positions][:, None, :]  # (T, 1, R/2)
    s = np.asarray(sin, np.float64)[positions][:, None, :]
    if interleaved:
        a, b = x[..., 0:2 * r2:2].copy(), x[..., 1:2 * r2:2].copy()
        x[..., 0:2 * r2:2] = a * c - b * s
        x[..., 1:2 * r2:2] = b * c + a * s
    else:
        a, b = x[..., :r2].copy(), x[..., r2:2 * r2].copy()
        x[..., :r2] = a * c - b * s
        x[..., r2:2 * r2] = b * c + a * s
    return x
