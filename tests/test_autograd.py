"""torch autograd through numba_attn and numba_attn.compat: gradcheck in float64 and the
gradients of torch's own SDPA autograd (tests skip without torch)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import numba_attn as na  # noqa: E402
from numba_attn import compat  # noqa: E402

F = torch.nn.functional


def _t(rng, *shape, dtype=torch.float64):
    return torch.tensor(rng.standard_normal(shape), dtype=dtype, requires_grad=True)


def _sdpa_bshd(q, k, v, causal=False, bias=None, scale=None):
    """torch SDPA over BSHD with GQA by repetition and bottom-right causal alignment."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    g = qt.shape[1] // kt.shape[1]
    kt, vt = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)
    L, S = qt.shape[2], kt.shape[2]
    mask = None
    if causal:
        mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    if bias is not None:
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale
                                          ).transpose(1, 2)


def _grads(f, xs, dout):
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in xs]
    out = f(*xs)
    out.backward(dout)
    return out.detach(), [x.grad for x in xs if x.requires_grad]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradients_equal_torch_sdpa_autograd(rng, causal):
    q, k, v = _t(rng, 2, 5, 4, 8), _t(rng, 2, 7, 2, 8), _t(rng, 2, 7, 2, 8)
    bias = _t(rng, 1, 4, 5, 7)
    dout = torch.tensor(rng.standard_normal((2, 5, 4, 8)))
    got = _grads(lambda q, k, v, b: na.attention(q, k, v, causal=causal, bias=b),
                 (q, k, v, bias), dout)
    want = _grads(lambda q, k, v, b: _sdpa_bshd(q, k, v, causal, b), (q, k, v, bias), dout)
    assert got[0].grad_fn is None  # detached copies compared
    torch.testing.assert_close(got[0], want[0])
    for g, w, name in zip(got[1], want[1], ["dq", "dk", "dv", "dbias"]):
        torch.testing.assert_close(g, w, msg=name)


def test_output_has_a_grad_fn_and_gradcheck_passes(rng):
    q, k, v = _t(rng, 1, 4, 2, 8), _t(rng, 1, 6, 1, 8), _t(rng, 1, 6, 1, 8)
    sinks = _t(rng, 2)
    out = na.attention(q, k, v, causal=True, sinks=sinks)
    assert out.grad_fn is not None and out.requires_grad
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: na.attention(q, k, v, causal=True, softcap=3.0, sinks=s,
                                        window=(2, 0)), (q, k, v, sinks))


def test_varlen_gradcheck(rng):
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    q, k, v = _t(rng, 5, 2, 8), _t(rng, 5, 1, 8), _t(rng, 5, 1, 8)
    assert torch.autograd.gradcheck(
        lambda q, k, v: na.attention_varlen(q, k, v, cu, cu, causal=True), (q, k, v))


def test_no_grad_mode_and_plain_tensors_stay_on_the_fast_path(rng):
    q = _t(rng, 1, 3, 2, 8)
    with torch.no_grad():
        assert na.attention(q, q, q).grad_fn is None
    assert na.attention(q.detach(), q.detach(), q.detach()).grad_fn is None


def test_out_is_refused_when_grad_is_needed(rng):
    q = _t(rng, 1, 3, 2, 8)
    with pytest.raises(na.AttentionError, match="out"):
        na.attention(q, q, q, out=torch.empty(1, 3, 2, 8, dtype=torch.float64))


def test_compat_sdpa_gradients_equal_torch(rng):
    q, k, v = _t(rng, 2, 4, 5, 8), _t(rng, 2, 2, 7, 8), _t(rng, 2, 2, 7, 8)
    bias = _t(rng, 5, 7)
    dout = torch.tensor(rng.standard_normal((2, 4, 5, 8)))
    got = _grads(lambda q, k, v, b: compat.scaled_dot_product_attention(
        q, k, v, attn_mask=b, enable_gqa=True), (q, k, v, bias), dout)
    want = _grads(lambda q, k, v, b: F.scaled_dot_product_attention(
        q, k, v, attn_mask=b, enable_gqa=True), (q, k, v, bias), dout)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("fn", ["flash_attn_func", "flash_attn_qkvpacked_func",
                                "flash_attn_kvpacked_func", "flash_attn_varlen_func"])
def test_compat_flash_functions_have_gradients(rng, fn):
    """Each compat function's gradients equal those of the native call it stands for."""
    q, k, v = _t(rng, 2, 6, 2, 8), _t(rng, 2, 6, 2, 8), _t(rng, 2, 6, 2, 8)
    dout = torch.tensor(rng.standard_normal((2, 6, 2, 8)))
    want = _grads(lambda q, k, v: _sdpa_bshd(q, k, v, causal=True), (q, k, v), dout)
    if fn == "flash_attn_func":
        f = lambda q, k, v: compat.flash_attn_func(q, k, v, causal=True)  # noqa: E731
    elif fn == "flash_attn_qkvpacked_func":
        f = lambda q, k, v: compat.flash_attn_qkvpacked_func(  # noqa: E731
            torch.stack([q, k, v], 2), causal=True)
    elif fn == "flash_attn_kvpacked_func":
        f = lambda q, k, v: compat.flash_attn_kvpacked_func(  # noqa: E731
            q, torch.stack([k, v], 2), causal=True)
    else:
        cu = torch.tensor([0, 6, 12], dtype=torch.int32)
        f = lambda q, k, v: compat.flash_attn_varlen_func(  # noqa: E731
            q.reshape(12, 2, 8), k.reshape(12, 2, 8), v.reshape(12, 2, 8), cu, cu, 6, 6,
            causal=True).reshape(2, 6, 2, 8)
    got = _grads(f, (q, k, v), dout)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)


def test_float32_training_step_matches_torch(rng):
    q, k, v = (_t(rng, 1, 16, 4, 32, dtype=torch.float32) for _ in range(3))
    dout = torch.tensor(rng.standard_normal((1, 16, 4, 32)), dtype=torch.float32)
    got = _grads(lambda q, k, v: na.attention(q, k, v, causal=True), (q, k, v), dout)
    want = _grads(lambda q, k, v: _sdpa_bshd(q, k, v, True), (q, k, v), dout)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
