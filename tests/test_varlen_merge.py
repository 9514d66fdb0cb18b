"""attention_varlen and merge_states against the oracle, plus a hypothesis property test."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_close

import numba_attn as na
from numba_attn import reference as ref

VARLEN_OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "top_left_window": dict(causal="top_left", window=(3, 0)),
    "softcap_alibi_sinks": dict(softcap=2.0, alibi_slopes=np.linspace(0.05, 0.4, 4),
                                sinks=np.array([0.1, -0.5, 1.0, 0.0])),
    "bias_mask": "bias_mask",
    "kv_lens": "kv_lens",
}


def _packed(rng, lens_q, lens_k, h, hkv, d, dtype):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], h, d)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], hkv, d)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], hkv, d)).astype(dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("opt", list(VARLEN_OPTIONS))
def test_varlen_matches_reference_with_empty_segments(rng, opt, dtype):
    lens_q = [5, 0, 1, 130, 7]
    lens_k = [9, 4, 0, 140, 7]
    q, k, v, cu_q, cu_k = _packed(rng, lens_q, lens_k, 4, 2, 24, dtype)
    kw = VARLEN_OPTIONS[opt]
    if kw == "bias_mask":
        kw = dict(bias=rng.standard_normal((5, 4, 130, 140)),
                  mask=rng.random((1, 1, 130, 140)) > 0.3)
    elif kw == "kv_lens":
        kw = dict(kv_lens=np.array([3, 4, 0, 100, 0]), causal=True)
    got, lse = na.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    expected, expected_lse = ref.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    assert lse.shape == (4, q.shape[0])
    assert_close(got, expected, dtype)
    assert_close(lse, expected_lse, dtype, "lse")


def test_varlen_equals_per_row_attention(rng):
    """Each packed row equals a batched call on that row alone (independent of reference)."""
    lens_q, lens_k = [3, 17, 1], [8, 17, 40]
    q, k, v, cu_q, cu_k = _packed(rng, lens_q, lens_k, 6, 3, 16, np.float64)
    got = na.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        row = na.attention(q[None, qs], k[None, ks], v[None, ks], causal=True)[0]
        np.testing.assert_allclose(got[qs], row, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("split", [0, 3, 40, 64], ids=lambda s: f"split{s}")
def test_merge_states_equals_attention_over_union(rng, split, dtype):
    """Attention over keys [0, split) merged with [split, 64) equals attention over all."""
    q = rng.standard_normal((2, 9, 4, 16)).astype(dtype)
    k = rng.standard_normal((2, 64, 2, 16)).astype(dtype)
    v = rng.standard_normal((2, 64, 2, 16)).astype(dtype)
    oa, la = na.attention(q, k[:, :split], v[:, :split], return_lse=True)
    ob, lb = na.attention(q, k[:, split:], v[:, split:], return_lse=True)
    got, lse = na.merge_states(oa, la, ob, lb)
    expected, expected_lse = ref.attention(q, k, v, return_lse=True)
    assert got.dtype == dtype
    assert_close(got, expected, dtype)
    assert_close(lse, expected_lse, dtype, "lse")
    ref_out, ref_lse = ref.merge_states(oa, la, ob, lb)
    assert_close(got, ref_out, dtype)


def test_merge_states_with_empty_parts_is_identity(rng):
    out = rng.standard_normal((5, 3, 8))
    lse = rng.standard_normal((3, 5))
    empty_out = np.zeros_like(out)
    empty_lse = np.full_like(lse, -np.inf)
    got, got_lse = na.merge_states(out, lse, empty_out, empty_lse)
    np.testing.assert_allclose(got, out, rtol=1e-14)
    np.testing.assert_allclose(got_lse, lse, rtol=1e-14)
    got, got_lse = na.merge_states(empty_out, empty_lse, empty_out, empty_lse)
    np.testing.assert_array_equal(got, 0.0)
    assert np.all(np.isneginf(got_lse))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_merge_states_goes_through_the_backend(rng, monkeypatch, dtype):
    """validate -> backend -> kernel, as every operation: "auto" picks the cpu backend for
    host arrays, "reference" runs the oracle, a backend that cannot serve says why."""
    from numba_attn import dispatch
    from numba_attn.config import BackendUnavailable

    oa, ob = (rng.standard_normal((2, 5, 3, 8)).astype(dtype) for _ in range(2))
    la, lb = (rng.standard_normal((2, 3, 5)).astype(dtype) for _ in range(2))
    la[0, 1, 2] = -np.inf
    cpu = dispatch.get_backend("cpu")
    calls = []
    real = type(cpu).merge
    monkeypatch.setattr(type(cpu), "merge", lambda self, *a: calls.append(a) or real(self, *a))
    got, got_lse = na.merge_states(oa, la, ob, lb)
    assert len(calls) == 1 and calls[0][0].shape == (2, 5, 3, 8)  # (lead, S, H, Dv)
    expected, expected_lse = ref.merge_states(oa, la, ob, lb)
    assert got.dtype == dtype and got_lse.dtype == dtype
    assert_close(got, expected, dtype)
    assert_close(got_lse, expected_lse, dtype, "lse")
    r, r_lse = na.merge_states(oa, la, ob, lb, backend="reference")
    assert len(calls) == 1 and r.dtype == dtype and r_lse.dtype == dtype
    assert_close(r, expected, dtype)
    assert_close(r_lse, expected_lse, dtype, "lse")
    if dispatch.available_backends()["cuda"] is None:  # a GPU or the simulator
        with pytest.raises(BackendUnavailable, match="merge: the cuda backend serves device"):
            na.merge_states(oa, la, ob, lb, backend="cuda")
    else:
        with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot serve"):
            na.merge_states(oa, la, ob, lb, backend="cuda")


@st.composite
def problems(draw):
    h_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    return dict(
        b=draw(st.integers(1, 3)), sq=draw(st.integers(1, 40)), sk=draw(st.integers(0, 160)),
        h=h_kv * group, hkv=h_kv, d=draw(st.sampled_from([8, 16, 40, 64])),
        causal=draw(st.sampled_from([False, True, "top_left"])),
        window=(draw(st.integers(-1, 20)), draw(st.integers(-1, 20))),
        softcap=draw(st.sampled_from([0.0, 0.0, 5.0])),
        alibi=draw(st.booleans()), sinks=draw(st.booleans()), kv_lens=draw(st.booleans()),
        mask=draw(st.booleans()), seed=draw(st.integers(0, 2**31)),
        dtype=draw(st.sampled_from([np.float32, np.float64])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_property_random_configurations(p):
    rng = np.random.default_rng(p["seed"])
    dt = p["dtype"]
    q = rng.standard_normal((p["b"], p["sq"], p["h"], p["d"])).astype(dt)
    k = rng.standard_normal((p["b"], p["sk"], p["hkv"], p["d"])).astype(dt)
    v = rng.standard_normal((p["b"], p["sk"], p["hkv"], p["d"])).astype(dt)
    kw = dict(causal=p["causal"], window=p["window"], softcap=p["softcap"])
    if p["alibi"]:
        kw["alibi_slopes"] = rng.uniform(0, 0.3, p["h"])
    if p["sinks"]:
        kw["sinks"] = rng.standard_normal(p["h"])
    if p["kv_lens"]:
        kw["kv_lens"] = rng.integers(0, p["sk"] + 1, p["b"])
    if p["mask"]:
        kw["mask"] = rng.random((p["b"], 1, p["sq"], p["sk"])) > 0.25
    got, lse = na.attention(q, k, v, return_lse=True, **kw)
    expected, expected_lse = ref.attention(q, k, v, return_lse=True, **kw)
    assert_close(got, expected, dt)
    assert_close(lse, expected_lse, dt, "lse")
