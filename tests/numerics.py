"""Comparison helpers shared by the tests: tolerances by dtype, -inf-aware closeness."""
from __future__ import annotations

import math

import numpy as np

# Tolerances by dtype (DESIGN.md, "Testing"): (atol, rtol) on outputs and lse.
TOLERANCES = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float16): (2e-3, 2e-3),
}


def tolerance(dtype):
    return TOLERANCES[np.dtype(dtype)]


def assert_close(got, expected, dtype, what="out"):
    """|got - expected| <= atol + rtol |expected|, with -inf lse entries matched exactly."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    inf_e = np.isneginf(expected)
    np.testing.assert_array_equal(np.isneginf(got), inf_e, err_msg=f"{what}: -inf pattern")
    atol, rtol = tolerance(dtype)
    fin = ~inf_e
    np.testing.assert_allclose(got[fin], expected[fin], atol=atol, rtol=rtol, err_msg=what)


def expected_inv_freq(rotary_dim, base, scaling):
    """Rotary inverse frequencies by Hugging Face's formulas (modeling_rope_utils), float64:
    no scaling, ``linear`` and ``llama3`` (``rope_type`` or the older ``type`` key)."""
    inv = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind is None:
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    assert kind == "llama3", kind
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled)


def expected_rope(rotary_dim, base, scaling, seq_len):
    """(inv_freq, attention_factor) of Hugging Face's ``dynamic``, ``yarn`` and ``longrope``
    types, written from transformers' documentation of ``_compute_*_parameters``
    (vectorised, independent of numba_attn.reference_rope)."""
    d = rotary_dim
    kind = scaling["rope_type"]
    expo = np.arange(0, d, 2, dtype=np.float64) / d
    if kind == "dynamic":
        m = scaling["max_position_embeddings"]
        length = max(seq_len, m)
        new_base = base * (scaling["factor"] * length / m - (scaling["factor"] - 1)) ** (
            d / (d - 2))
        return new_base ** -expo, 1.0
    orig = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or scaling["max_position_embeddings"] / orig
    if kind == "longrope":
        ext = np.asarray(scaling["long_factor"] if seq_len > orig else scaling["short_factor"])
        att = scaling.get("attention_factor")
        if att is None:
            att = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
        return 1.0 / (ext * base ** expo), att
    assert kind == "yarn", kind

    def mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    att = scaling.get("attention_factor")
    if att is None:
        ms, msa = scaling.get("mscale"), scaling.get("mscale_all_dim")
        att = mscale(factor, ms) / mscale(factor, msa) if ms and msa else mscale(factor)
    # dimension index i at which a wavelength completes r rotations over orig positions
    dim_of = lambda r: d * math.log(orig / (2 * math.pi * r)) / (2 * math.log(base))  # noqa
    low, high = dim_of(scaling.get("beta_fast", 32)), dim_of(scaling.get("beta_slow", 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    interp_weight = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    extrap, interp = base ** -expo, base ** -expo / factor
    return interp * interp_weight + extrap * (1 - interp_weight), att
