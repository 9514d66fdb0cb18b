"""RMSNorm (as in Llama, Qwen3's QK-norm and DeepSeek's latent norms): a thin wrapper
over one CPU kernel (:mod:`numba_attn.cpu.norm`) and its CUDA twin."""
from __future__ import annotations

import numpy as np

from . import dispatch as dp
from .config import AttentionError, check_real
from .interop import Array, to_numpy
from .validate import check_norm_out

__all__ = ["rms_norm", "rms_norm_backward"]


def rms_norm(x: Array, weight: Array, *args: float, eps: float = 1e-6,
             out: Array | None = None) -> Array:
    """Root-mean-square normalisation over the last axis.

    ``y = x / sqrt(mean(x ** 2, axis=-1) + eps) * weight`` (Zhang & Sennrich 2019; Hugging
    Face's ``LlamaRMSNorm``). float16/bfloat16 inputs are accumulated in float32, float64
    in float64.

    Parameters
    ----------
    x : array (..., dim)
        float16, bfloat16, float32 or float64; a numpy array or a CUDA device array.
    weight : array (dim,)
        The learned gain, on the same device as ``x``.
    eps : float, default 1e-6
        Added to the mean square; finite and >= 0. Keyword-only, as everywhere else in
        numba_attn (a third positional argument still works this release, with a
        DeprecationWarning).
    out : array like x, optional
        Written in place and returned (numpy inputs only).

    Returns
    -------
    y : array like x, dtype of x

    Raises
    ------
    AttentionError (ValueError)
        ``weight`` is not ``(dim,)``, ``eps`` is negative or not finite.
    TypeError
        Unsupported dtype, or ``out`` of another shape/dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn import rms_norm
    >>> x = np.array([[3.0, 4.0]], np.float32)
    >>> y = rms_norm(x, np.ones(2, np.float32), eps=0.0)  # rms of (3, 4) is sqrt(12.5)
    >>> print(np.round(y, 4))
    [[0.8485 1.1314]]
    """
    eps = _positional_eps("rms_norm", args, eps)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x: expected an array (..., dim), got {type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) < 1 or shape[-1] == 0:
        raise AttentionError(f"x: expected shape (..., dim) with dim > 0, got {shape}")
    dt = dp.check_float("x", x)
    dim = shape[-1]
    if not hasattr(weight, "shape") or tuple(weight.shape) != (dim,):
        got = tuple(weight.shape) if hasattr(weight, "shape") else type(weight).__name__
        raise AttentionError(f"weight: expected shape (dim,) = ({dim},), got {got}")
    dp.check_float("weight", weight)
    eps = check_real("eps", eps)
    if eps < 0.0:
        raise AttentionError(f"eps: must be finite and >= 0, got {eps!r}")
    check_norm_out(x, out, dt)
    return dp.elementwise("norm", x).rms_norm(x, weight, eps, out)


def rms_norm_backward(dout: Array = None, x: Array = None, weight: Array = None,
                      *args: float, eps: float = 1e-6,
                      dy: Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of ``y = rms_norm(x, weight, eps=eps)``.

    With ``r = sqrt(mean(x^2) + eps)`` over the last axis: ``dx = (g - x mean(g x) / r^2)
    / r`` where ``g = dout * weight``, and ``dweight = sum(dout * x / r)`` over every leading
    axis.

    Parameters
    ----------
    dout, x : ndarray (..., dim)
        ``dout`` is the gradient of ``y`` (named ``dy`` before 0.3; ``dy=`` still works
        this release, with a DeprecationWarning).
    weight : ndarray (dim,)
    eps : float, default 1e-6
        Keyword-only (positional: DeprecationWarning), as in :func:`rms_norm`.

    Returns
    -------
    dx : ndarray like x; dweight : ndarray (dim,)

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn import rms_norm_backward
    >>> x = np.array([[3.0, 4.0]]); w = np.ones(2)
    >>> dx, dw = rms_norm_backward(np.ones((1, 2)), x, w, eps=0.0)
    >>> dx.shape, dw.shape
    ((1, 2), (2,))
    """
    dout = _renamed("rms_norm_backward", "dy", dy, "dout", dout)
    eps = _positional_eps("rms_norm_backward", args, eps)
    x = to_numpy("x", x)
    dy = to_numpy("dout", dout)
    weight = to_numpy("weight", weight)
    if dy.shape != x.shape:
        raise AttentionError(f"dout: shape {dy.shape} differs from x's {x.shape}")
    if weight.shape != (x.shape[-1],):
        raise AttentionError(f"weight: expected shape ({x.shape[-1]},), got {weight.shape}")
    eps = check_real("eps", eps)
    ct = np.float64 if np.dtype(x.dtype) == np.float64 else np.float32
    xc, g0, wc = x.astype(ct), dy.astype(ct), weight.astype(ct)
    inv = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + ct(eps))
    g = g0 * wc
    dx = inv * (g - xc * (inv * inv) * np.mean(g * xc, axis=-1, keepdims=True))
    dw = (g0 * xc * inv).reshape(-1, x.shape[-1]).sum(axis=0)
    return dx.astype(x.dtype, copy=False), dw.astype(weight.dtype, copy=False)


def _positional_eps(fname, args, eps):
    """eps given as a positional argument (the old signature): warn, and use it."""
    if not args:
        return eps
    if len(args) > 1:
        raise TypeError(f"{fname}() takes eps as its only extra argument, got {len(args)}")
    import warnings

    warnings.warn(f"{fname}: pass eps as a keyword (eps=...); positional eps is deprecated "
                  "and will be removed in the next release", DeprecationWarning, stacklevel=3)
    return args[0]


def _renamed(fname, old, old_value, new, value):
    """A keyword renamed this release: the old name still works, with a warning."""
    if old_value is None:
        if value is None:
            raise TypeError(f"{fname}() missing required argument '{new}'")
        return value
    if value is not None:
        raise TypeError(f"{fname}(): pass {new} or {old}, not both")
    import warnings

    warnings.warn(f"{fname}: {old}= is renamed {new}=; {old}= will be removed in the next "
                  "release", DeprecationWarning, stacklevel=3)
    return old_value
