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
