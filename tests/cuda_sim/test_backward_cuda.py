"""The CUDA backward and dropout forward against numba_attn.reference (tiny shapes: the
simulator is slow), and the dropout keep mask of CUDA equal to the CPU one bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn
from numba_attn import reference

CASES = {
    "gqa-causal-dropout": {"causal": True, "dropout_p": 0.3, "seed": 9},
    "window-softcap-alibi": {"window": (2, 1), "softcap": 2.0, "alibi_slopes": True},
    "bias-mask-sinks-kv_lens": {"bias": (1, 4, 3, 5), "mask": True, "sinks": True,
                                    "kv_lens": [5, 0], "causal": "top_left"},
}


def _inputs(rng, opts):
    b, sq, sk, h, hkv, d, dv = 2, 3, 5, 4, 2, 4, 3
    q = rng.standard_normal((b, sq, h, d))
    k = rng.standard_normal((b, sk, hkv, d))
    v = rng.standard_normal((b, sk, hkv, dv))
    kw = dict(opts)
    if kw.pop("alibi_slopes", None):
        kw["alibi_slopes"] = rng.uniform(0.1, 0.5, h)
    if "bias" in kw:
        kw["bias"] = rng.standard_normal(kw["bias"])
    if kw.pop("mask", None):
        kw["mask"] = rng.random((b, 1, sq, sk)) < 0.7
    if kw.pop("sinks", None):
        kw["sinks"] = rng.standard_normal(h)
    if "kv_lens" in kw:
        kw["kv_lens"] = np.array(kw["kv_lens"])
    return q, k, v, kw


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_backward_matches_reference(rng, name):
    q, k, v, kw = _inputs(rng, CASES[name])
    out, lse = numba_attn.attention(q, k, v, return_lse=True, backend="cuda", **kw)
    ro, rl = reference.attention(q, k, v, return_lse=True, **kw)
    np.testing.assert_allclose(out, ro, atol=1e-10, rtol=1e-10)
    dout = rng.standard_normal(out.shape)
    flags = {"return_dbias": "bias" in kw, "return_dsinks": "sinks" in kw}
    got = numba_attn.attention_backward(dout, q, k, v, out, lse, backend="cuda", **flags, **kw)
    exp = [e for e in reference.attention_backward(dout, q, k, v, ro, rl, **kw)
           if e is not None]
    assert len(got) == len(exp)
    for g, e in zip(got, exp):
        np.testing.assert_allclose(g, e, atol=1e-10, rtol=1e-9)


def test_cuda_dropout_mask_equals_cpu_bit_for_bit():
    b, sq, sk, h = 1, 4, 6, 2
    q = np.zeros((b, sq, h, 4))
    k = np.ones((b, sk, 1, 4))
    v = np.broadcast_to(np.eye(sk)[None, :, None, :], (b, sk, 1, sk)).copy()
    a = numba_attn.attention(q, k, v, dropout_p=0.5, seed=123, backend="cuda")
    c = numba_attn.attention(q, k, v, dropout_p=0.5, seed=123, backend="cpu")
    assert np.array_equal(a > 0, c > 0)
    np.testing.assert_allclose(a, c, atol=1e-14)


def test_cuda_backward_of_device_arrays_gives_device_arrays(rng):
    from numba import cuda

    q, k, v, kw = _inputs(rng, {"causal": True, "sinks": True})
    out, lse = reference.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    dev = [cuda.to_device(x) for x in (dout, q, k, v, out, lse)]
    got = numba_attn.attention_backward(*dev, return_dsinks=True, **kw)
    exp = reference.attention_backward(dout, q, k, v, out, lse, **kw)
    for g, e in zip(got, [e for e in exp if e is not None]):
        assert hasattr(g, "copy_to_host")
        np.testing.assert_allclose(g.copy_to_host(), e, atol=1e-10, rtol=1e-9)
    with pytest.raises(numba_attn.AttentionError, match="same device"):
        numba_attn.attention_backward(dout, *dev[1:], **kw)
