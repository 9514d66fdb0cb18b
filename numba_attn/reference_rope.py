"""Plain numpy float64 oracle of rotary embeddings and of a KV-cache decoding step.

Readable over fast, like :mod:`numba_attn.reference`: the tests compare
:func:`numba_attn.apply_rotary`, :func:`numba_attn.rotary_cos_sin` and
:func:`numba_attn.attention_with_kvcache` with these.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["inv_freq", "rope_parameters", "rotary_cos_sin", "apply_rotary"]


def inv_freq(rotary_dim, base=10000.0, scaling=None, seq_len=None):
    """Frequencies ``base ** (-2i / rotary_dim)``, i < rotary_dim / 2, after ``scaling``.

    The first element of :func:`rope_parameters` (see there for ``scaling``).
    """
    return rope_parameters(rotary_dim, base, scaling, seq_len)[0]


def _kind(scaling):
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type")) or "default"


def _yarn_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(rotary_dim, base=10000.0, scaling=None, seq_len=None):
    """(inv_freq float64 (rotary_dim // 2,), attention_factor) of Hugging Face's RoPE types.

    ``scaling`` follows Hugging Face's ``rope_scaling`` / ``rope_parameters`` (the
    ``_compute_*_parameters`` functions of ``transformers.modeling_rope_utils``):

    - ``linear``: every frequency divided by ``factor``.
    - ``llama3``: long wavelengths divided by ``factor``, short ones kept, a blend between
      ``original_max_position_embeddings / low_freq_factor`` and ``/ high_freq_factor``.
    - ``dynamic`` (NTK): ``base * (factor * L / M - (factor - 1)) ** (d / (d - 2))`` with
      ``L = max(seq_len, M)``, ``M = max_position_embeddings``.
    - ``yarn``: interpolated ``1 / (factor * base ** (2i/d))`` and original frequencies
      blended by a linear ramp between the correction dims of ``beta_fast`` (32) and
      ``beta_slow`` (1) rotations over ``original_max_position_embeddings`` (floored and
      ceiled unless ``truncate`` is False); ``attention_factor`` defaults to
      ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are given,
      else ``0.1 ln(factor) + 1``.
    - ``longrope``: ``1 / (ext[i] * base ** (2i/d))`` with ``ext = long_factor`` when
      ``seq_len > original_max_position_embeddings``, else ``short_factor``;
      ``attention_factor`` defaults to ``sqrt(1 + ln(factor) / ln(original))``, ``factor``
      to ``max_position_embeddings / original_max_position_embeddings``.

    ``seq_len`` (the length the tables serve, Hugging Face's ``max(position_ids) + 1``)
    matters for ``dynamic`` and ``longrope`` only. ``attention_factor`` multiplies cos and
    sin (1.0 except for yarn and longrope).
    """
    d = rotary_dim
    expo = np.arange(0, d, 2, dtype=np.float64) / d
    freq = 1.0 / base ** expo
    kind = _kind(scaling)
    if kind == "default":
        return freq, 1.0
    get = scaling.get
    if kind == "linear":
        return freq / float(scaling["factor"]), 1.0
    if kind == "llama3":  # Hugging Face's _compute_llama3_parameters, per frequency
        factor = float(scaling["factor"])
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
        return out, 1.0
    if kind == "dynamic":
        factor = float(scaling["factor"])
        m = float(get("max_position_embeddings") or scaling["original_max_position_embeddings"])
        length = max(float(seq_len or m), m)
        b = base * ((factor * length / m) - (factor - 1.0)) ** (d / (d - 2))
        return 1.0 / b ** expo, 1.0
    old = float(scaling["original_max_position_embeddings"])
    factor = get("factor")
    if factor is None:
        factor = float(scaling["max_position_embeddings"]) / old
    factor = float(factor)
    att = get("attention_factor")
    if kind == "yarn":
        if att is None:
            ms, ms_all = get("mscale"), get("mscale_all_dim")
            att = (_yarn_mscale(factor, float(ms)) / _yarn_mscale(factor, float(ms_all))
                   if ms and ms_all else _yarn_mscale(factor))
        beta_fast, beta_slow = float(get("beta_fast") or 32), float(get("beta_slow") or 1)

        def corr_dim(rotations):
            return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        if lo == hi:
            hi += 0.001  # as Hugging Face: no division by zero
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        keep = 1.0 - ramp  # 1: the original (extrapolated) frequency
        return freq / factor * (1.0 - keep) + freq * keep, float(att)
    if kind == "longrope":
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1.0 + math.log(factor) / math.log(old))
        ext = scaling["long_factor"] if seq_len and seq_len > old else scaling["short_factor"]
        return freq / np.asarray(ext, dtype=np.float64), float(att)
    raise ValueError(f"unknown rope type {kind!r}")


def rotary_cos_sin(max_position, rotary_dim, base=10000.0, scaling=None, seq_len=None):
    """cos, sin float64 tables of shape (max_position, rotary_dim // 2), times the
    attention factor; ``seq_len`` defaults to ``max_position``."""
    freq, att = rope_parameters(rotary_dim, base, scaling,
                                max_position if seq_len is None else seq_len)
    ang = np.outer(np.arange(max_position, dtype=np.float64), freq)
    return np.cos(ang) * att, np.sin(ang) * att


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
