"""rms_norm against the published formula (Zhang & Sennrich 2019), written here in float64."""
import numpy as np
import pytest

from numba_attn import AttentionError
from numba_attn.norm import rms_norm


def naive_rms_norm(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


TOL = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-13}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(7,), (3, 40), (2, 5, 128), (1, 0, 17), (600, 130)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_formula(rng, dtype, shape):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    got = rms_norm(x, w, eps=1e-5)
    expected = naive_rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=TOL[dtype],
                               atol=TOL[dtype] * max(1.0, np.abs(expected).max(initial=0)))


def test_float16_accumulates_in_float32(rng):
    # sum of squares of 4096 values ~ 60 overflows float16 (max 65504) if accumulated there
    x = np.full((1, 4096), 60.0, np.float16)
    got = rms_norm(x, np.ones(4096, np.float16))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got.astype(np.float64), 1.0, rtol=2e-3)


def test_out_written_in_place(rng):
    x = rng.standard_normal((4, 9)).astype(np.float32)
    w = rng.standard_normal(9).astype(np.float32)
    out = np.zeros_like(x)
    assert rms_norm(x, w, 1e-6, out=out) is out
    np.testing.assert_allclose(out, naive_rms_norm(x, w, 1e-6), rtol=2e-6, atol=1e-6)


def test_non_contiguous_input(rng):
    x = rng.standard_normal((6, 32)).astype(np.float32)[:, ::2]
    w = rng.standard_normal(16).astype(np.float32)
    np.testing.assert_allclose(rms_norm(x, w), naive_rms_norm(x, w, 1e-6), rtol=2e-6,
                               atol=1e-6)


@pytest.mark.parametrize("weight, eps, exc, word", [
    (np.ones(5, np.float32), 1e-6, AttentionError, "weight"),
    (np.ones((8, 1), np.float32), 1e-6, AttentionError, "weight"),
    (np.ones(8, np.float32), -1.0, AttentionError, "eps"),
    (np.ones(8, np.float32), float("nan"), AttentionError, "eps"),
    (np.ones(8, np.int32), 1e-6, TypeError, "weight"),
], ids=["weight-len", "weight-rank", "eps-negative", "eps-nan", "weight-int"])
def test_bad_input(weight, eps, exc, word):
    with pytest.raises(exc, match=word):
        rms_norm(np.ones((2, 8), np.float32), weight, eps)


def test_bad_x_dtype():
    with pytest.raises(TypeError, match="x"):
        rms_norm(np.ones((2, 8), np.int64), np.ones(8, np.float32))


def test_cuda_twin_matches_formula(rng):
    from numba_attn import available_backends

    why = available_backends().get("cuda", "no CUDA backend registered")
    if why:
        pytest.skip(f"cuda backend unavailable: {why}")
    from numba import cuda

    x = rng.standard_normal((3, 200)).astype(np.float32)
    w = rng.standard_normal(200).astype(np.float32)
    got = rms_norm(cuda.to_device(x), cuda.to_device(w), 1e-6).copy_to_host()
    np.testing.assert_allclose(got, naive_rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
