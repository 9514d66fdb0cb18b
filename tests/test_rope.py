"""Rotary embeddings against independent float64 formulas (complex rotation, HF scaling)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from numerics import expected_inv_freq

import numba_attn
from numba_attn import AttentionError

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def expected_rotary(x, inv_freq, positions, interleaved):
    """Rotate channel pairs as complex numbers: z * exp(i * position * freq)."""
    x = np.asarray(x, np.float64).copy()
    r2 = len(inv_freq)
    angle = np.asarray(positions, np.float64)[..., None, None] * inv_freq  # (..., 1, R/2)
    rot = np.exp(1j * angle)
    if interleaved:
        z = (x[..., 0:2 * r2:2] + 1j * x[..., 1:2 * r2:2]) * rot
        x[..., 0:2 * r2:2], x[..., 1:2 * r2:2] = z.real, z.imag
    else:
        z = (x[..., :r2] + 1j * x[..., r2:2 * r2]) * rot
        x[..., :r2], x[..., r2:2 * r2] = z.real, z.imag
    return x


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"type": "linear", "factor": 2.0}, LLAMA3],
                         ids=["plain", "linear", "linear-type-key", "llama3"])
@pytest.mark.parametrize("base", [10000.0, 500000.0], ids=["base1e4", "base5e5"])
def test_cos_sin_tables(scaling, base):
    got_cos, got_sin = numba_attn.rotary_cos_sin(300, 16, base=base, scaling=scaling,
                                                 dtype=np.float64)
    angle = np.arange(300)[:, None] * expected_inv_freq(16, base, scaling)[None, :]
    np.testing.assert_allclose(got_cos, np.cos(angle), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_sin, np.sin(angle), rtol=1e-12, atol=1e-12)


def test_llama3_scaling_touches_only_low_frequencies():
    plain = expected_inv_freq(64, 500000.0, None)
    cos_p, _ = numba_attn.rotary_cos_sin(50, 64, base=500000.0, dtype=np.float64)
    cos_s, _ = numba_attn.rotary_cos_sin(50, 64, base=500000.0, scaling=LLAMA3,
                                         dtype=np.float64)
    high = 2 * math.pi / plain < 64 / 4.0  # wavelengths under old / high_freq_factor
    assert high.any() and (~high).any()
    np.testing.assert_array_equal(cos_s[:, high], cos_p[:, high])
    assert not np.allclose(cos_s[:, ~high], cos_p[:, ~high])


TOL = {np.float64: 1e-12, np.float32: 2e-6, np.float16: 2e-3}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16],
                         ids=["float32", "float64", "float16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (10, 6), (59, 32)],
                         ids=["full", "partial-10-6", "partial-59-32"])
@pytest.mark.parametrize("positions", ["none", "offset", "per-token"])
def test_apply_rotary(rng, dtype, interleaved, head_dim, rotary_dim, positions):
    b, s, h = 2, 5, 3
    x = rng.standard_normal((b, s, h, head_dim)).astype(dtype)
    cos, sin = numba_attn.rotary_cos_sin(40, rotary_dim, dtype=np.float64 if dtype ==
                                         np.float64 else np.float32,
                                         scaling={"rope_type": "linear", "factor": 2.0})
    pos = {"none": (None, np.broadcast_to(np.arange(s), (b, s))),
           "offset": (7, np.broadcast_to(7 + np.arange(s), (b, s))),
           "per-token": (rng.integers(0, 40, (b, s)),) * 2}[positions]
    got = numba_attn.apply_rotary(x, cos, sin, interleaved=interleaved, positions=pos[0])
    inv = expected_inv_freq(rotary_dim, 10000.0, {"rope_type": "linear", "factor": 2.0})
    expected = expected_rotary(x, inv, pos[1], interleaved)
    assert got.dtype == x.dtype and got.shape == x.shape
    tol = TOL[dtype] * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got.astype(np.float64), expected, atol=tol, rtol=TOL[dtype])
    np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])


def test_apply_rotary_packed_rows_and_broadcast_positions(rng):
    x = rng.standard_normal((6, 2, 8))  # (total, heads, head_dim)
    cos, sin = numba_attn.rotary_cos_sin(20, 8, dtype=np.float64)
    pos = np.array([0, 1, 2, 0, 1, 9])
    got = numba_attn.apply_rotary(x, cos, sin, positions=pos)
    np.testing.assert_allclose(got, expected_rotary(x, expected_inv_freq(8, 1e4, None), pos,
                                                    False), atol=1e-12)


def test_apply_rotary_leaves_input_alone(rng):
    x = rng.standard_normal((1, 4, 2, 8)).astype(np.float32)
    before = x.copy()
    cos, sin = numba_attn.rotary_cos_sin(8, 8)
    numba_attn.apply_rotary(x, cos, sin)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("call,exc,word", [
    (lambda x, c, s: numba_attn.apply_rotary(x, *numba_attn.rotary_cos_sin(8, 10)),
     AttentionError, "rotary_dim"),
    (lambda x, c, s: numba_attn.apply_rotary(x, c, s, positions=5), AttentionError,
     "positions"),
    (lambda x, c, s: numba_attn.apply_rotary(x, c, s, positions=np.full((1, 4), -1)),
     AttentionError, "positions"),
    (lambda x, c, s: numba_attn.apply_rotary(x, c, s, positions=np.zeros(3, int)),
     AttentionError, "positions"),
    (lambda x, c, s: numba_attn.apply_rotary(x, c, s, positions=np.zeros(4)), TypeError,
     "positions"),
    (lambda x, c, s: numba_attn.apply_rotary(x, c, s[:, :2]), AttentionError, "rotary_sin"),
    (lambda x, c, s: numba_attn.apply_rotary(x[0, 0], c, s), AttentionError, "x"),
    (lambda x, c, s: numba_attn.apply_rotary(x.astype(int), c, s), TypeError, "x"),
    (lambda x, c, s: numba_attn.rotary_cos_sin(8, 7), AttentionError, "rotary_dim"),
    (lambda x, c, s: numba_attn.rotary_cos_sin(0, 8), AttentionError, "max_position"),
    (lambda x, c, s: numba_attn.rotary_cos_sin(8, 8, base=1.0), AttentionError, "base"),
    (lambda x, c, s: numba_attn.rotary_cos_sin(8, 8, scaling={"rope_type": "yarn"}),
     AttentionError, "scaling"),
    (lambda x, c, s: numba_attn.rotary_cos_sin(8, 8, scaling={"rope_type": "llama3",
                                                               "factor": 8.0}),
     AttentionError, "scaling"),
], ids=["rotary_dim>head_dim", "offset-past-table", "negative-position", "positions-shape",
        "float-positions", "cos-sin-shapes", "x-rank", "x-int", "odd-rotary_dim",
        "zero-positions", "base<=1", "unknown-scaling", "llama3-missing-keys"])
def test_rotary_errors(call, exc, word):
    x = np.ones((1, 4, 2, 8), np.float32)
    cos, sin = numba_attn.rotary_cos_sin(8, 8)
    with pytest.raises(exc, match=word):
        call(x, cos, sin)


def test_rotary_keyword_names_follow_one_rule():
    """Where rotary is the function's subject (apply_rotary, its backward, rotary_cos_sin)
    its tables and flag are plain ``cos`` / ``sin`` / ``interleaved``; where it is one
    option among many (attention_with_kvcache, the layers) they are ``rotary_cos`` /
    ``rotary_sin`` / ``rotary_interleaved``. compat keeps FlashAttention's own names."""
    import inspect

    import numba_attn
    from numba_attn import compat

    plain, prefixed = {"cos", "sin", "interleaved"}, {"rotary_cos", "rotary_sin",
                                                       "rotary_interleaved"}
    seen = set()
    for name in numba_attn.__all__:
        obj = getattr(numba_attn, name)
        if not callable(obj) or (isinstance(obj, type) and issubclass(obj, Exception)):
            continue
        params = set(inspect.signature(obj).parameters)
        if "rotary" in name:
            assert not params & prefixed, (name, params & prefixed)
        else:
            assert not params & plain, (name, params & plain)
        seen |= params & (plain | prefixed)
    assert seen == plain | prefixed  # both forms are in use, each where the rule puts it
    fa = inspect.signature(compat.flash_attn_with_kvcache).parameters
    assert {"rotary_cos", "rotary_sin", "rotary_interleaved"} <= set(fa)
    for cls in (numba_attn.MultiHeadAttention, numba_attn.MultiHeadLatentAttention):
        assert "rotary_interleaved" in inspect.signature(cls).parameters
