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
