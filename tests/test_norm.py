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
    assert rms_norm(x, w, eps=1e-6, out=out) is out
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
        rms_norm(np.ones((2, 8), np.float32), weight, eps=eps)


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
    got = rms_norm(cuda.to_device(x), cuda.to_device(w), eps=1e-6).copy_to_host()
    np.testing.assert_allclose(got, naive_rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_positional_eps_and_dy_still_work_with_a_deprecation_warning():
    """API drift (issue 18): eps is keyword-only and the gradient is ``dout`` everywhere;
    the old spellings give the same numbers for one release, with a warning."""
    import numba_attn as na

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    d = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.warns(DeprecationWarning, match="eps"):
        old = rms_norm(x, w, 1e-2)
    np.testing.assert_array_equal(old, rms_norm(x, w, eps=1e-2))
    with pytest.warns(DeprecationWarning, match="dy= is renamed dout="):
        gx_old, gw_old = na.rms_norm_backward(dy=d, x=x, weight=w, eps=1e-2)
    gx, gw = na.rms_norm_backward(d, x, w, eps=1e-2)
    np.testing.assert_array_equal(gx_old, gx)
    np.testing.assert_array_equal(gw_old, gw)
    with pytest.raises(TypeError, match="dout or dy, not both"):
        na.rms_norm_backward(d, x, w, dy=d)
    cos, sin = na.rotary_cos_sin(8, 8)
    x4 = rng.standard_normal((1, 3, 2, 8))
    with pytest.warns(DeprecationWarning, match="dy= is renamed dout="):
        r_old = na.apply_rotary_backward(dy=x4, cos=cos, sin=sin)
    np.testing.assert_array_equal(r_old, na.apply_rotary_backward(x4, cos, sin))
    from numba_attn import training

    assert training.rms_norm_backward is na.rms_norm_backward  # the old home re-exports


def test_rms_norm_and_rotary_run_on_the_backend_dispatch_picks(rng, monkeypatch):
    """The public functions hold no backend branch: the CPU backend's rms_norm / rotary run
    host arrays (counted here), and what they return is what the caller gets."""
    import numba_attn
    from numba_attn import dispatch, reference_rope

    cpu = dispatch.get_backend("cpu")
    calls = []
    for op in ("rms_norm", "rotary"):
        orig = getattr(cpu, op)
        monkeypatch.setattr(cpu, op, lambda *a, _o=orig, _n=op: calls.append(_n) or _o(*a))
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    y = rms_norm(x, w, eps=1e-6)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    cos, sin = numba_attn.rotary_cos_sin(16, 8)
    r = numba_attn.apply_rotary(x, cos, sin)
    np.testing.assert_allclose(r, reference_rope.apply_rotary(x64, cos, sin, np.arange(5)),
                               rtol=1e-5,
                               atol=1e-5)
    assert calls == ["rms_norm", "rotary"]
    assert dispatch.elementwise("norm", x) is cpu
