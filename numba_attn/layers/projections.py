"""Projections of the layers and their input checks: ``linear`` (BLAS, a GEMV path for a
few tokens, widened half weights, LoRA) with its backward :func:`linear_backward` beside it,
:func:`check_lora`, :func:`check_hidden`, :func:`check_positions`. Shared by every layer
module (below all of them).
"""
from __future__ import annotations

import numpy as np

from .. import dispatch as dp
from ..config import AttentionError

__all__ = ["linear", "linear_backward", "widen", "check_lora", "check_hidden",
           "check_positions"]

_LORA_TARGETS = ("q", "k", "v", "o")


def linear(x, w, b=None, lora=None, lora_scale=1.0):
    """``x @ w.T (+ b) (+ lora_scale * x @ A.T @ B.T)`` for x (..., in), w (out, in).

    A few tokens (decode) go through numba_attn's own parallel GEMV (see cpu/linear.py
    for why); more go to numpy's BLAS.
    """
    y = _few_token_gemv(x, w)
    if y is None:
        y = x @ (widen(w, x.dtype) if w.dtype != x.dtype else w).T
    if b is not None:
        y += b
    if lora is not None:
        a, bb = lora
        y += (lora_scale * (x @ a.T)) @ bb.T
    return y


def linear_backward(x, dy, w, lora=None, lora_scale=1.0):
    """Gradients of ``linear(x, w, b, lora, lora_scale)``: (dx, dw, db, dA, dB).

    ``y = x w^T + b + s (x A^T) B^T`` gives ``dw = dy^T x``, ``db = sum dy``,
    ``dx = dy w + s (dy B) A``, ``dA = s (dy B)^T x``, ``dB = s dy^T (x A^T)``
    (dA, dB None without LoRA).
    """
    n_in, n_out = x.shape[-1], dy.shape[-1]
    x2 = x.reshape(-1, n_in)
    dy2 = dy.reshape(-1, n_out)
    dw = dy2.T @ x2
    db = dy2.sum(axis=0)
    dx = dy2 @ w
    da = dbb = None
    if lora is not None:
        a, b = lora
        dyb = dy2 @ b
        dbb = lora_scale * (dy2.T @ (x2 @ a.T))
        da = lora_scale * (dyb.T @ x2)
        dx = dx + lora_scale * (dyb @ a)
    return dx.reshape(x.shape), dw, db, da, dbb


def _put_linear(grads, name, res, has_bias, lora_key, lora_used):
    _, dw, db, da, dbb = res
    grads[f"{name}.weight"] = dw
    if has_bias:
        grads[f"{name}.bias"] = db
    if lora_used:
        grads[f"lora.{lora_key}.A"] = da
        grads[f"lora.{lora_key}.B"] = dbb


GEMV_MAX_TOKENS = 4
GEMV_BF16_MAX_TOKENS = 16  # bfloat16 weights: past this, widen the matrix and use BLAS


def widen(w, dtype):
    """Weights ``w`` as ``dtype``; bfloat16 is widened exactly by a 16-bit shift."""
    if w.dtype.name == "bfloat16" and np.dtype(dtype) in (np.float32, np.float64):
        wide = (w.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
        return wide.astype(dtype, copy=False)
    return w.astype(dtype)


def _few_token_gemv(x, w):
    """``x @ w.T`` through cpu.linear.gemv for <= GEMV_MAX_TOKENS rows, else None.

    bfloat16 weights with float32 ``x`` are passed as their uint16 bits (widened in
    registers by the kernel), for up to GEMV_BF16_MAX_TOKENS rows.
    """
    bf16 = w.dtype.name == "bfloat16" and x.dtype == np.float32
    if (type(x) is not np.ndarray or type(w) is not np.ndarray
            or (x.dtype != w.dtype and not bf16)
            or x.dtype not in (np.float32, np.float64) or not w.flags.c_contiguous
            or not w.flags.writeable
            or x.ndim < 1 or x.size // max(x.shape[-1], 1)
            > (GEMV_BF16_MAX_TOKENS if bf16 else GEMV_MAX_TOKENS)):
        return None
    from .._jit import parallel_guard
    from ..cpu.linear import gemv

    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty((x2.shape[0], w.shape[0]), x.dtype)
    with parallel_guard():
        gemv(x2, w.view(np.uint16) if bf16 else w, out)
    return out.reshape(x.shape[:-1] + (w.shape[0],))


def check_lora(lora, shapes, dtype):
    """Validate ``{"q": (A, B), ...}`` against ``shapes[name] = (out, in)``; returns a dict of
    (A, B) cast to ``dtype``."""
    if lora is None:
        return {}
    if not isinstance(lora, dict):
        raise TypeError(f"lora: expected a dict like {{'q': (A, B)}}, got {type(lora).__name__}")
    unknown = sorted(set(lora) - set(shapes))
    if unknown:
        raise AttentionError(f"lora: unknown target(s) {unknown}; expected a subset of "
                             f"{sorted(shapes)}")
    got = {}
    for name, pair in lora.items():
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise TypeError(f"lora[{name!r}]: expected a pair (A, B), got "
                            f"{type(pair).__name__}") from None
        a, b = np.asarray(a), np.asarray(b)
        n_out, n_in = shapes[name]
        if a.ndim != 2 or a.shape[1] != n_in:
            raise AttentionError(f"lora[{name!r}]: A must be (rank, in_features) = "
                                 f"(rank, {n_in}), got {a.shape}")
        if b.shape != (n_out, a.shape[0]):
            raise AttentionError(f"lora[{name!r}]: B must be (out_features, rank) = "
                                 f"({n_out}, {a.shape[0]}), got {b.shape}")
        got[name] = (a.astype(dtype, copy=False), b.astype(dtype, copy=False))
    return got


def check_hidden(name, x, hidden, dtype):
    """x (batch, seq, hidden) as a C-contiguous host array of ``dtype``."""
    dp.check_rank(name, x, 3, f"(batch, seqlen, hidden_size={hidden})")
    if dp.array_device(x) != "cpu":
        raise TypeError(f"{name}: layers take host (numpy) arrays; pass backend='cuda' to "
                        f"run attention on the GPU")
    dp.check_float(name, x)
    if x.shape[2] != hidden:
        raise AttentionError(f"{name}: last axis must be hidden_size={hidden}, got shape "
                             f"{tuple(x.shape)}")
    return dp.host(name, x, dtype)


def check_positions(positions, batch, seq):
    """(batch, seq) int64 positions from None-free (seq,) or (batch, seq) input."""
    p = dp.host_operand("positions", positions, "iu", "an integer array")
    if p.dtype == np.uint64 and p.size and p.max() > 2**62:
        raise AttentionError(f"positions: must be < 2**62, got {int(p.max())}")
    if p.shape == (seq,):
        p = np.broadcast_to(p, (batch, seq))
    if p.shape != (batch, seq):
        raise AttentionError(f"positions: expected shape (seqlen,) = ({seq},) or (batch, "
                             f"seqlen) = ({batch}, {seq}), got {p.shape}")
    if p.size and p.min() < 0:
        raise AttentionError(f"positions: must be >= 0, got min {p.min()}")
    return np.ascontiguousarray(p, dtype=np.int64)


