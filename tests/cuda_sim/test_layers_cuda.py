"""Attention layers on the CUDA backend (simulator or GPU): the CUDA cases of
tests/test_layers.py, test_mla.py and test_norm.py, run in this directory's process."""
import pytest
import test_layers
import test_mla
import test_norm


@pytest.mark.parametrize("case", list(test_layers.CASES))
def test_self_attention_matches_formulas(rng, case):
    test_layers.test_self_attention_matches_formulas(rng, case, "cuda")


def test_cross_attention(rng):
    test_layers.test_cross_attention(rng, "cuda")


@pytest.mark.parametrize("kw", [dict(rope_theta=1e4), dict(rope_theta=1e4, qk_norm=True,
                                                            sliding_window=4)],
                         ids=["rope", "qknorm-window"])
def test_device_cache_prefill_then_decode(rng, kw):
    test_layers.test_prefill_then_decode_equals_full_forward(rng, "cuda", kw)


def test_mla_naive_prefill(rng):
    test_mla.test_naive_prefill_on_cuda_backend(rng)


def test_rms_norm_kernel(rng):
    test_norm.test_cuda_twin_matches_formula(rng)


@pytest.mark.parametrize("name, tune", [("v3-like-small", dict(nsplit=2)),
                                        ("bias-vdim-ne-nope", dict(heads=1))],
                         ids=["split-keys", "one-head-per-block"])
def test_mla_absorbed_decode_on_a_device_cache(rng, name, tune, tuned):
    """Absorbed decoding over an MLACache on the device == the float64 equations, and ==
    the same steps over a host MLACache on the CPU kernels, step by step."""
    import numpy as np

    m, params = test_mla._make(name, np.float32, rng)
    x = rng.standard_normal((2, 5, m.hidden_size)).astype(np.float32)
    cache = m.new_cache(2, 8, device="cuda")
    host = m.new_cache(2, 8)
    assert hasattr(cache.kv, "copy_to_host") and cache.device == "cuda"
    steps = [slice(0, 3), slice(3, 4), slice(4, 5)]
    with tuned(**tune):
        parts = [m(x[:, st], cache=cache) for st in steps]
    cpu_parts = [m(x[:, st], cache=host, backend="cpu") for st in steps]
    assert cache.seqlens.tolist() == host.seqlens.tolist() == [5, 5]
    for got, want in zip(parts, cpu_parts):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), test_mla.ref_mla(m, params, x),
                               **test_mla.TOL[np.float32])
    # the device cache holds the same latents and rope keys as the host one
    np.testing.assert_allclose(cache.kv.copy_to_host()[:, :5], host.kv[:, :5], rtol=1e-6,
                               atol=1e-6)


def test_mla_device_cache_overflow_and_wrong_backend_leave_it_unchanged(rng):
    import numpy as np

    from numba_attn import AttentionError, BackendUnavailable

    m, _ = test_mla._make("v3-like-small", np.float32, rng)
    cache = m.new_cache(1, 4, device="cuda")
    x = rng.standard_normal((1, 3, m.hidden_size)).astype(np.float32)
    m(x, cache=cache)
    before = cache.kv.copy_to_host()
    with pytest.raises(AttentionError, match="overflow"):
        m(x, cache=cache)
    with pytest.raises(BackendUnavailable, match="cpu"):
        m(x[:, :1], cache=cache, backend="cpu")
    assert cache.seqlens.tolist() == [3]
    np.testing.assert_array_equal(cache.kv.copy_to_host(), before)
