"""The CUDA forward against numba_attn.reference, on tiny shapes (the simulator is slow).

Every case runs with forced small, odd tiles (3 queries, 5 keys, one warp) unless it says
otherwise, so several query tiles, key tiles and their tails are exercised.
"""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn
from numba_attn import reference

TOL = {np.float16: dict(rtol=3e-3, atol=3e-3), np.float32: dict(rtol=2e-5, atol=2e-5),
       np.float64: dict(rtol=1e-10, atol=1e-10)}


def _qkv(rng, b, sq, sk, h, hkv, d, dv=None, dtype=np.float32):
    dv = d if dv is None else dv
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hkv, dv)).astype(dtype)
    return q, k, v


def _check(got, expected, dtype, what="out"):
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, err_msg=what,
                               **TOL[dtype])


# (id, shape (b, sq, sk, h, hkv, d, dv), options, tuning overrides)
CASES = [
    ("mha", (2, 5, 7, 2, 2, 8, None), {}, {}),
    ("gqa-causal", (1, 5, 9, 4, 2, 8, None), dict(causal=True), {}),
    ("mqa-top_left", (1, 6, 4, 3, 1, 8, None), dict(causal="top_left"), {}),
    ("causal-sq>sk-empty-rows", (1, 7, 4, 2, 1, 8, None), dict(causal=True), {}),
    ("window", (1, 6, 11, 2, 2, 8, None), dict(window=(2, 1)), {}),
    ("window-left-causal", (1, 6, 11, 2, 1, 8, None), dict(causal=True, window=(3, -1)), {}),
    ("softcap", (1, 4, 7, 2, 2, 8, None), dict(softcap=0.7, scale=2.0), {}),
    ("alibi-causal", (2, 4, 6, 2, 1, 8, None), dict(causal=True, alibi_slopes="h"), {}),
    ("alibi-per-batch", (2, 3, 6, 2, 2, 8, None), dict(alibi_slopes="bh"), {}),
    ("bias-broadcast", (2, 4, 6, 2, 1, 8, None), dict(bias=(1, 2, 4, 6)), {}),
    ("bias-2d", (1, 4, 6, 2, 2, 8, None), dict(bias=(4, 6), causal=True), {}),
    ("mask", (2, 4, 6, 2, 2, 8, None), dict(mask=(2, 1, 4, 6)), {}),
    ("kv_lens-with-0", (3, 3, 7, 2, 1, 8, None), dict(kv_lens=[7, 0, 4], causal=True), {}),
    ("sinks", (2, 4, 5, 2, 2, 8, None), dict(sinks=True, kv_lens=[5, 0]), {}),
    ("head_dim_v", (1, 4, 6, 2, 1, 8, 12), dict(causal=True), {}),
    ("two-warps-gqa", (1, 5, 8, 4, 1, 8, None), dict(causal=True), dict(num_warps=2)),
    ("two-keys-per-lane", (1, 3, 45, 2, 1, 8, None), dict(window=(30, 0)), dict(block_k=40)),
    ("decode-split", (2, 1, 17, 4, 2, 8, None), dict(kv_lens=[17, 9]), dict(nsplit=3)),
    ("decode-split-sinks", (1, 1, 13, 2, 2, 8, None), dict(sinks=True), dict(nsplit=4)),
    ("default-plan", (1, 5, 19, 2, 2, 16, None), dict(causal=True), "default"),
]


def _options(rng, opts, b, sq, sk, h):
    opts = dict(opts)
    if opts.get("alibi_slopes") == "h":
        opts["alibi_slopes"] = rng.uniform(0.1, 1.0, h)
    elif opts.get("alibi_slopes") == "bh":
        opts["alibi_slopes"] = rng.uniform(0.1, 1.0, (b, h))
    if "bias" in opts:
        opts["bias"] = rng.standard_normal(opts["bias"])
    if "mask" in opts:
        m = rng.random(opts["mask"]) < 0.7
        m[..., 1, :] = False  # a query row that sees nothing
        opts["mask"] = m
    if opts.get("sinks"):
        opts["sinks"] = rng.standard_normal(h)
    if "kv_lens" in opts:
        opts["kv_lens"] = np.array(opts["kv_lens"], np.int32)
    return opts


@pytest.mark.parametrize("shape, opts, tune", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_attention_matches_reference(rng, tuned, shape, opts, tune):
    b, sq, sk, h, hkv, d, dv = shape
    q, k, v = _qkv(rng, b, sq, sk, h, hkv, d, dv)
    opts = _options(rng, opts, b, sq, sk, h)
    expected, expected_lse = reference.attention(q, k, v, return_lse=True, **opts)
    if tune == "default":
        got, lse = numba_attn.attention(q, k, v, return_lse=True, backend="cuda", **opts)
    else:
        with tuned(**tune):
            got, lse = numba_attn.attention(q, k, v, return_lse=True, backend="cuda", **opts)
    assert got.shape == expected.shape and got.dtype == np.float32
    _check(got, expected, np.float32)
    _check(lse, expected_lse, np.float32, "lse")


@pytest.mark.parametrize("dtype", [np.float16, np.float64], ids=["float16", "float64"])
def test_dtypes(rng, tuned, dtype):
    q, k, v = _qkv(rng, 1, 4, 7, 2, 1, 8, dtype=dtype)
    expected, expected_lse = reference.attention(q, k, v, causal=True, return_lse=True)
    with tuned():
        got, lse = numba_attn.attention(q, k, v, causal=True, return_lse=True,
                                        backend="cuda")
    assert got.dtype == dtype
    _check(got, expected, dtype)
    _check(lse, expected_lse, dtype if dtype == np.float64 else np.float32, "lse")


def test_bfloat16_host_inputs(rng, tuned):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in _qkv(rng, 1, 3, 6, 2, 2, 8))
    expected = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    with tuned():
        got = numba_attn.attention(q, k, v, causal=True, backend="cuda")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=2e-2, atol=2e-2)


def test_varlen_with_empty_row(rng, tuned):
    cu_q = np.array([0, 3, 3, 7], np.int32)  # the middle row has no queries
    cu_k = np.array([0, 5, 7, 13], np.int32)
    q = rng.standard_normal((7, 4, 8)).astype(np.float32)
    k = rng.standard_normal((13, 2, 8)).astype(np.float32)
    v = rng.standard_normal((13, 2, 8)).astype(np.float32)
    opts = dict(causal=True, kv_lens=np.array([4, 2, 0], np.int32), sinks=None)
    expected, expected_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True,
                                                        **opts)
    with tuned():
        got, lse = numba_attn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True,
                                               backend="cuda", **opts)
    _check(got, expected, np.float32)
    _check(lse, expected_lse, np.float32, "lse")
    assert np.all(lse[:, 3:] == -np.inf) and np.all(got[3:] == 0)  # kv_lens 0: empty rows


def test_out_argument_host(rng, tuned):
    q, k, v = _qkv(rng, 1, 3, 5, 2, 2, 8)
    out = np.full((1, 3, 2, 8), np.nan, np.float32)
    with tuned():
        got = numba_attn.attention(q, k, v, out=out, backend="cuda")
    assert got is out
    _check(out, reference.attention(q, k, v), np.float32)


def _random_case(rng):
    """A random small problem with random options and random (tiny) tiles."""
    hkv = int(rng.integers(1, 3))
    h = hkv * int(rng.integers(1, 4))
    b, sq, sk = int(rng.integers(1, 3)), int(rng.integers(1, 8)), int(rng.integers(1, 14))
    d = int(rng.choice([4, 8, 12]))
    opts = {}
    if rng.random() < 0.5:
        opts["causal"] = str(rng.choice(["bottom_right", "top_left"]))
    if rng.random() < 0.3:
        opts["window"] = tuple(int(x) for x in rng.integers(-1, 4, 2))
    if rng.random() < 0.3:
        opts["softcap"] = float(rng.uniform(0.5, 3.0))
    if rng.random() < 0.3:
        opts["alibi_slopes"] = rng.uniform(0.0, 1.0, h)
    if rng.random() < 0.3:
        opts["bias"] = rng.standard_normal((b, 1, sq, sk))
    if rng.random() < 0.3:
        opts["mask"] = rng.random((1, h, sq, sk)) < 0.6
    if rng.random() < 0.3:
        opts["kv_lens"] = rng.integers(0, sk + 1, b)
    if rng.random() < 0.3:
        opts["sinks"] = rng.standard_normal(h)
    tune = dict(block_q=int(rng.integers(1, 5)), block_k=int(rng.integers(1, 40)),
                num_warps=int(rng.integers(1, 3)), nsplit=int(rng.integers(1, 4)))
    return (b, sq, sk, h, hkv, d), opts, tune


@pytest.mark.parametrize("seed", range(12), ids=lambda s: f"seed{s}")
def test_random_options_match_reference(tuned, seed):
    rng = np.random.default_rng(1000 + seed)
    (b, sq, sk, h, hkv, d), opts, tune = _random_case(rng)
    q, k, v = _qkv(rng, b, sq, sk, h, hkv, d)
    expected, expected_lse = reference.attention(q, k, v, return_lse=True, **opts)
    with tuned(**tune):
        got, lse = numba_attn.attention(q, k, v, return_lse=True, backend="cuda", **opts)
    _check(got, expected, np.float32, f"out {opts} {tune}")
    _check(lse, expected_lse, np.float32, f"lse {opts} {tune}")
