"""The backward oracle (reference.attention_backward) against central finite differences
of reference.attention: the independent check of the oracle itself (float64, tiny shapes)."""
from __future__ import annotations

import numpy as np
import pytest

from numba_attn import reference as ref

EPS = 1e-6


def _fd(loss, x, eps=EPS):
    """Central differences of scalar ``loss()`` w.r.t. every entry of ``x`` (in place)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for n in range(flat.size):
        old = flat[n]
        flat[n] = old + eps
        up = loss()
        flat[n] = old - eps
        dn = loss()
        flat[n] = old
        gflat[n] = (up - dn) / (2 * eps)
    return g


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "causal_top_left": {"causal": "top_left"},
    "window": {"window": (2, 1)},
    "softcap": {"softcap": 1.5},
    "alibi": {"alibi": True},
    "bias_full": {"bias": (2, 4, 3, 5)},
    "bias_bcast": {"bias": (4, 1, 5)},
    "bias_row": {"bias": (5,)},
    "mask": {"mask": True},
    "kv_lens": {"kv_lens": [5, 2]},
    "sinks": {"sinks": True},
    "sinks_empty_rows": {"sinks": True, "window": (0, -1), "kv_lens": [5, 1]},
    "dropout": {"dropout_p": 0.3},
    "all": {"causal": True, "softcap": 2.0, "alibi": True, "bias": (1, 4, 3, 5),
            "mask": True, "sinks": True, "dropout_p": 0.25},
}


def _problem(rng, case, hkv=2, dv=3):
    b, sq, sk, h, d = 2, 3, 5, 4, 4
    q = rng.standard_normal((b, sq, h, d))
    k = rng.standard_normal((b, sk, hkv, d))
    v = rng.standard_normal((b, sk, hkv, dv))
    kw = {}
    for key in ("causal", "window", "softcap"):
        if key in case:
            kw[key] = case[key]
    if case.get("alibi"):
        kw["alibi_slopes"] = rng.uniform(0.1, 0.5, h)
    if "bias" in case:
        kw["bias"] = rng.standard_normal(case["bias"])
    if case.get("mask"):
        m = rng.random((b, 1, sq, sk)) < 0.7
        m[0, 0, 1] = False  # a query that sees nothing
        kw["mask"] = m
    if "kv_lens" in case:
        kw["kv_lens"] = np.array(case["kv_lens"])
    if case.get("sinks"):
        kw["sinks"] = rng.standard_normal(h)
    if "dropout_p" in case:
        kw["dropout_p"], kw["seed"] = case["dropout_p"], 1234
    return q, k, v, kw


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_backward_matches_finite_differences(rng, name):
    q, k, v, kw = _problem(rng, CASES[name])
    out, lse = ref.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv, dbias, dsinks = ref.attention_backward(dout, q, k, v, out, lse, **kw)

    def loss():
        return float(np.sum(ref.attention(q, k, v, **kw) * dout))

    for name_, x, g in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
        np.testing.assert_allclose(g, _fd(loss, x), atol=1e-6, rtol=1e-5, err_msg=name_)
    if "bias" in kw:
        assert dbias.shape == kw["bias"].shape
        np.testing.assert_allclose(dbias, _fd(loss, kw["bias"]), atol=1e-6, rtol=1e-5)
    else:
        assert dbias is None
    if "sinks" in kw:
        np.testing.assert_allclose(dsinks, _fd(loss, kw["sinks"]), atol=1e-6, rtol=1e-5)
    assert np.all(np.isfinite(dq)) and np.all(np.isfinite(dk))


def test_reference_backward_mqa_and_empty_rows_zero(rng):
    q, k, v, kw = _problem(rng, {"causal": "top_left", "window": (0, 0)}, hkv=1)
    kw["kv_lens"] = np.array([0, 5])
    out, lse = ref.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv, _, _ = ref.attention_backward(dout, q, k, v, out, lse, **kw)
    assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)

    def loss():
        return float(np.sum(ref.attention(q, k, v, **kw) * dout))

    np.testing.assert_allclose(dk, _fd(loss, k), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(dq, _fd(loss, q), atol=1e-6, rtol=1e-5)


def test_reference_varlen_backward_matches_finite_differences(rng):
    h, hkv, d, dv = 4, 2, 3, 5
    cq = np.array([0, 2, 2, 5])  # an empty query segment
    ck = np.array([0, 3, 4, 8])
    q = rng.standard_normal((5, h, d))
    k = rng.standard_normal((8, hkv, d))
    v = rng.standard_normal((8, hkv, dv))
    kw = {"causal": True, "bias": rng.standard_normal((1, h, 3, 4)), "sinks": rng.standard_normal(h),
              "softcap": 3.0, "dropout_p": 0.2, "seed": 99}
    out, lse = ref.attention_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    dq, dk, dvv, dbias, dsinks = ref.attention_varlen_backward(dout, q, k, v, out, lse, cq, ck,
                                                               **kw)

    def loss():
        return float(np.sum(ref.attention_varlen(q, k, v, cq, ck, **kw) * dout))

    for x, g in ((q, dq), (k, dk), (v, dvv), (kw["bias"], dbias), (kw["sinks"], dsinks)):
        np.testing.assert_allclose(g, _fd(loss, x), atol=1e-6, rtol=1e-5)


def test_dropout_keep_rate_and_reproducible():
    from numba_attn.dropout import keep_mask

    i = np.arange(256)[:, None]
    j = np.arange(256)[None, :]
    a = keep_mask(7, 0, 3, i, j, 0.3)
    assert np.array_equal(a, keep_mask(7, 0, 3, i, j, 0.3))
    # 65536 Bernoulli(0.7) draws: 5 sigma is 0.009
    assert abs(a.mean() - 0.7) < 0.009
    assert not np.array_equal(a, keep_mask(8, 0, 3, i, j, 0.3))
    assert not np.array_equal(a, keep_mask(7, 1, 3, i, j, 0.3))
    assert not np.array_equal(a, keep_mask(7, 0, 2, i, j, 0.3))
    # neighbouring rows / columns are not correlated
    x = a.astype(float) - a.mean()
    assert abs((x[1:] * x[:-1]).mean()) / x.var() < 0.02
    assert abs((x[:, 1:] * x[:, :-1]).mean()) / x.var() < 0.02
