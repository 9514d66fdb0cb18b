"""attention_backward / attention_varlen_backward and dropout on the CPU kernels, against the
float64 oracle (reference.attention_backward, itself checked by finite differences in
test_backward_reference.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import numba_attn as na
from numba_attn import reference as ref
from numba_attn.config import AttentionError
from numba_attn.dropout import keep_mask


def _close(got, exp, dtype, what):
    got = np.asarray(got, np.float64)
    assert got.shape == exp.shape, what
    assert np.all(np.isfinite(got)), what
    if np.dtype(dtype) == np.float64:
        atol, rtol = 1e-10, 1e-9
    elif np.dtype(dtype) == np.float32:
        atol, rtol = 2e-5 * (1 + np.abs(exp).max()), 1e-4
    else:
        atol, rtol = 3e-3 * (1 + np.abs(exp).max()), 1e-2
    np.testing.assert_allclose(got, exp, atol=atol, rtol=rtol, err_msg=what)


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "top_left": {"causal": "top_left"},
    "window": {"window": (3, 2)},
    "window_causal": {"window": (2, 0), "causal": True},
    "softcap": {"softcap": 2.5},
    "alibi": {"alibi": (4,)},
    "alibi_batch": {"alibi": (2, 4)},
    "bias_full": {"bias": (2, 4, 6, 9)},
    "bias_heads": {"bias": (4, 1, 9)},
    "bias_keys": {"bias": (9,)},
    "bias_q": {"bias": (1, 1, 6, 1)},
    "mask": {"mask": (2, 1, 6, 9)},
    "kv_lens": {"kv_lens": [9, 3]},
    "sinks": {"sinks": True},
    "dropout": {"dropout_p": 0.3},
    "combo": {"causal": True, "softcap": 3.0, "alibi": (4,), "bias": (1, 4, 6, 9),
              "mask": (2, 4, 6, 9), "kv_lens": [7, 9], "sinks": True, "dropout_p": 0.2,
              "window": (4, -1)},
}


def _inputs(rng, case, *, b=2, sq=6, sk=9, h=4, hkv=2, d=5, dv=7, dtype=np.float64):
    q = rng.standard_normal((b, sq, h, d))
    k = rng.standard_normal((b, sk, hkv, d))
    v = rng.standard_normal((b, sk, hkv, dv))
    kw = {}
    for key in ("causal", "window", "softcap"):
        if key in case:
            kw[key] = case[key]
    if "alibi" in case:
        kw["alibi_slopes"] = rng.uniform(0.05, 0.5, case["alibi"])
    if "bias" in case:
        kw["bias"] = rng.standard_normal(case["bias"])
    if "mask" in case:
        m = rng.random(case["mask"]) < 0.7
        m[0, :, 2] = False  # a query row that sees nothing
        kw["mask"] = m
    if "kv_lens" in case:
        kw["kv_lens"] = np.array(case["kv_lens"])
    if case.get("sinks"):
        kw["sinks"] = rng.standard_normal(h)
    if "dropout_p" in case:
        kw["dropout_p"], kw["seed"] = case["dropout_p"], 2024
    return [x.astype(dtype) for x in (q, k, v)], kw


def _check(rng, q, k, v, kw, dtype, what=""):
    out, lse = na.attention(q, k, v, return_lse=True, **kw)
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    kw64 = {n: (x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f"
                else x) for n, x in kw.items()}
    ro, rl = ref.attention(*f64, return_lse=True, **kw64)
    _close(out, ro, dtype, what + " out")
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = na.attention_backward(dout, q, k, v, out, lse, return_dbias="bias" in kw,
                                  return_dsinks="sinks" in kw, **kw)
    exp = ref.attention_backward(dout.astype(np.float64), *f64, ro, rl, **kw64)
    names = ["dq", "dk", "dv"] + (["dbias"] if "bias" in kw else []) + (
        ["dsinks"] if "sinks" in kw else [])
    exp = [e for e in exp if e is not None]
    assert len(grads) == len(names)
    for n, g, e in zip(names, grads, exp):
        assert g.dtype == np.dtype(dtype), n
        _close(g, e, dtype, f"{what} {n}")
    return grads


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_matches_oracle(rng, name, dtype):
    (q, k, v), kw = _inputs(rng, CASES[name], dtype=dtype)
    _check(rng, q, k, v, kw, dtype, name)


@pytest.mark.parametrize("shape", [
    {"h": 4, "hkv": 4, "sq": 9, "sk": 4, "d": 3, "dv": 3},  # MHA, seqlen_q > seqlen_k
    {"h": 6, "hkv": 1, "sq": 3, "sk": 11, "d": 7, "dv": 2},  # MQA
    {"h": 6, "hkv": 3, "sq": 1, "sk": 5, "d": 16, "dv": 16},  # GQA, one query
])
@pytest.mark.parametrize("causal", [False, True, "top_left"])
def test_backward_head_layouts(rng, shape, causal):
    (q, k, v), kw = _inputs(rng, {"causal": causal}, **shape)
    _check(rng, q, k, v, kw, np.float64)


def test_backward_float16_computed_in_float32(rng):
    (q, k, v), kw = _inputs(rng, {"causal": True, "sinks": True}, dtype=np.float16)
    _check(rng, q, k, v, kw, np.float16)


def test_rows_without_keys_have_zero_gradients(rng):
    (q, k, v), kw = _inputs(rng, {"causal": "top_left", "window": (0, 0)})
    kw["kv_lens"] = np.array([0, 9])
    g = _check(rng, q, k, v, kw, np.float64)
    assert np.all(g[0][0] == 0) and np.all(g[1][0] == 0) and np.all(g[2][0] == 0)
    mask = np.ones((2, 1, 6, 9), bool)
    mask[1, :, 3] = False
    (q, k, v), kw = _inputs(rng, {})
    kw["mask"] = mask
    g = _check(rng, q, k, v, kw, np.float64)
    assert np.all(g[0][1, 3] == 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_varlen_backward_matches_oracle(rng, dtype):
    h, hkv, d, dv = 4, 2, 5, 3
    cq = np.array([0, 3, 3, 7, 8], np.int32)  # an empty query segment
    ck = np.array([0, 4, 6, 6, 11], np.int32)  # an empty key segment
    q = rng.standard_normal((8, h, d)).astype(dtype)
    k = rng.standard_normal((11, hkv, d)).astype(dtype)
    v = rng.standard_normal((11, hkv, dv)).astype(dtype)
    kw = {"causal": True, "bias": rng.standard_normal((1, h, 4, 5)).astype(dtype),
              "sinks": rng.standard_normal(h).astype(dtype), "softcap": 3.0, "dropout_p": 0.25, "seed": 3,
              "kv_lens": np.array([4, 1, 0, 4])}
    out, lse = na.attention_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    kw64 = dict(kw, bias=kw["bias"].astype(np.float64), sinks=kw["sinks"].astype(np.float64))
    ro, rl = ref.attention_varlen(*f64, cq, ck, return_lse=True, **kw64)
    _close(out, ro, dtype, "out")
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = na.attention_varlen_backward(dout, q, k, v, out, lse, cq, ck, return_dbias=True,
                                       return_dsinks=True, **kw)
    exp = ref.attention_varlen_backward(dout.astype(np.float64), *f64, ro, rl, cq, ck, **kw64)
    for n, g, e in zip(("dq", "dk", "dv", "dbias", "dsinks"), got, exp):
        _close(g, e, dtype, n)


def test_reference_backend_agrees(rng):
    (q, k, v), kw = _inputs(rng, CASES["combo"])
    out, lse = na.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    a = na.attention_backward(dout, q, k, v, out, lse, return_dbias=True, return_dsinks=True,
                              **kw)
    b = na.attention_backward(dout, q, k, v, out, lse, return_dbias=True, return_dsinks=True,
                              backend="reference", **kw)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-10, rtol=1e-9)
    ro = na.attention(q, k, v, backend="reference", **kw)
    np.testing.assert_allclose(out, ro, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------
def _kernel_mask(seed, p, b=2, sq=40, sk=48, h=3, dtype=np.float64):
    """The keep mask the CPU kernel applied, read back exactly: equal scores (q = 0) and
    one-hot values give out[b, i, h, j] = keep / ((1 - p) sk)."""
    q = np.zeros((b, sq, h, 4), dtype)
    k = np.ones((b, sk, 1, 4), dtype)
    v = np.broadcast_to(np.eye(sk, dtype=dtype)[None, :, None, :], (b, sk, 1, sk)).copy()
    out = na.attention(q, k, v, dropout_p=p, seed=seed)
    scaled = out * (1 - p) * sk
    keep = scaled > 0.5
    np.testing.assert_allclose(scaled[keep], 1.0, rtol=1e-6)
    return keep.transpose(0, 2, 1, 3)  # (b, h, i, j)


def test_dropout_mask_is_the_counter_based_one():
    keep = _kernel_mask(11, 0.4)
    b, h, i, j = np.meshgrid(*(np.arange(n) for n in keep.shape), indexing="ij")
    assert np.array_equal(keep, keep_mask(11, b, h, i, j, 0.4))
    # 11520 Bernoulli(0.6) draws: 5 sigma = 0.023
    assert abs(keep.mean() - 0.6) < 0.023
    assert not np.array_equal(keep, _kernel_mask(12, 0.4))
    np.testing.assert_array_equal(_kernel_mask(11, 0.4, dtype=np.float32), keep)


def test_dropout_zero_is_the_plain_forward(rng):
    (q, k, v), kw = _inputs(rng, {"causal": True})
    a = na.attention(q, k, v, **kw)
    b = na.attention(q, k, v, dropout_p=0.0, seed=5, **kw)
    assert np.array_equal(a, b)


def test_dropout_writes_the_out_buffer(rng):
    (q, k, v), kw = _inputs(rng, {"dropout_p": 0.5})
    buf = np.full((2, 6, 4, 7), np.nan)
    got = na.attention(q, k, v, out=buf, **kw)
    assert got is buf
    np.testing.assert_allclose(buf, ref.attention(q, k, v, **kw), atol=1e-12)


_SCRIPT = r"""
import numpy as np, numba_attn as na
rng = np.random.default_rng(0)
q = rng.standard_normal((2, 33, 4, 8)); k = rng.standard_normal((2, 40, 2, 8))
v = rng.standard_normal((2, 40, 2, 8))
kw = dict(causal=True, dropout_p=0.3, seed=77, sinks=rng.standard_normal(4))
out, lse = na.attention(q, k, v, return_lse=True, **kw)
g = na.attention_backward(np.ones_like(out), q, k, v, out, lse, **kw)
np.save(OUT, np.concatenate([out.ravel()] + [x.ravel() for x in g]))
"""


def test_dropout_results_do_not_depend_on_thread_count(tmp_path):
    res = []
    for n in (1, 2):
        path = tmp_path / f"r{n}.npy"
        env = dict(os.environ, NUMBA_NUM_THREADS=str(n),
                   PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
        subprocess.run([sys.executable, "-c", _SCRIPT.replace("OUT", repr(str(path)))],
                       check=True, env=env, timeout=600)
        res.append(np.load(path))
    assert np.array_equal(res[0], res[1])


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_p_validated(rng, p):
    (q, k, v), _ = _inputs(rng, {})
    with pytest.raises(AttentionError, match="dropout_p"):
        na.attention(q, k, v, dropout_p=p, seed=1)


def test_dropout_needs_seed_and_errors_name_arguments(rng):
    (q, k, v), _ = _inputs(rng, {})
    with pytest.raises(AttentionError, match="seed"):
        na.attention(q, k, v, dropout_p=0.1)
    out, lse = na.attention(q, k, v, return_lse=True)
    with pytest.raises(AttentionError, match="seed"):
        na.attention_backward(out, q, k, v, out, lse, dropout_p=0.1)
    with pytest.raises(AttentionError, match="return_dbias"):
        na.attention_backward(out, q, k, v, out, lse, return_dbias=True)
    with pytest.raises(AttentionError, match="return_dsinks"):
        na.attention_backward(out, q, k, v, out, lse, return_dsinks=True)
    with pytest.raises(AttentionError, match="dout"):
        na.attention_backward(out[:, :3], q, k, v, out, lse)
    with pytest.raises(AttentionError, match="lse"):
        na.attention_backward(out, q, k, v, out, lse[:, :2])
    with pytest.raises(TypeError, match="seed"):
        na.attention(q, k, v, dropout_p=0.1, seed=1.5)


def _numpy_backward(dout, q, k, v, causal, dtype):
    """The plain FlashAttention-2 backward in numpy at ``dtype`` (MHA/GQA, causal or not)."""
    dout, q, k, v = (x.astype(dtype) for x in (dout, q, k, v))
    group = q.shape[2] // k.shape[2]
    kh, vh = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = dtype(1.0 / np.sqrt(q.shape[-1]))
    s = np.einsum("bihd,bjhd->bhij", q, kh) * scale
    if causal:
        sq, sk = s.shape[-2:]
        s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhij,bjhd->bihd", p, vh)
    dp = np.einsum("bihd,bjhd->bhij", dout, vh)
    ds = p * (dp - np.einsum("bihd,bihd->bhi", dout, out)[..., None])
    dq = np.einsum("bhij,bjhd->bihd", ds, kh) * scale
    dkh = np.einsum("bhij,bihd->bjhd", ds, q) * scale
    dvh = np.einsum("bhij,bihd->bjhd", p, dout)
    sh = k.shape
    return (dq, dkh.reshape(sh[0], sh[1], sh[2], group, -1).sum(3),
            dvh.reshape(sh[0], sh[1], sh[2], group, -1).sum(3))


@pytest.mark.parametrize("causal", [False, True])
def test_float32_error_within_twice_plain_numpy_float32(rng, causal):
    """FlashAttention's rule: a float32 gradient's error against float64 is at most twice
    that of a plain float32 implementation, plus 8 float32 ulps of max |g| (measured here:
    dq 2.5x, dk 1.6x, dv 1.9x the plain error, inside that slack: the kernel takes p from
    the float32 forward's lse and the SIMD exp)."""
    q = rng.standard_normal((2, 70, 4, 32)).astype(np.float32)
    k = rng.standard_normal((2, 90, 2, 32)).astype(np.float32)
    v = rng.standard_normal((2, 90, 2, 24)).astype(np.float32)
    out, lse = na.attention(q, k, v, causal=causal, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    got = na.attention_backward(dout, q, k, v, out, lse, causal=causal)
    exact = _numpy_backward(dout, q, k, v, causal, np.float64)
    plain = _numpy_backward(dout, q, k, v, causal, np.float32)
    for name, g, e, p in zip(("dq", "dk", "dv"), got, exact, plain):
        err = np.abs(g.astype(np.float64) - e).max()
        ref_err = np.abs(p.astype(np.float64) - e).max()
        ulp = np.finfo(np.float32).eps * np.abs(e).max()
        assert err <= 2 * ref_err + 8 * ulp, (name, err, ref_err)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_torch_autograd(causal):
    """An outside reference: torch's SDPA autograd (GQA by repeated K/V there), torch
    tensors in and out."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 7, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    out, lse = na.attention(q, k, v, causal=causal, return_lse=True)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    dq, dk, dv = na.attention_backward(dout, q, k, v, out, lse, causal=causal)
    assert isinstance(dq, torch.Tensor)
    mask = torch.ones(5, 7, dtype=torch.bool).tril(2) if causal else None
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, dim=2).transpose(1, 2),
        v.repeat_interleave(2, dim=2).transpose(1, 2), attn_mask=mask).transpose(1, 2)
    o.backward(dout)
    for got, exp in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        np.testing.assert_allclose(got.numpy(), exp.numpy(), atol=1e-12, rtol=1e-10)
