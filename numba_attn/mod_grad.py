"""The derivative of a user's ``score_mod`` for the backward: given, or derived automatically.

The backward multiplies each score's gradient by ``d score_mod / d score`` at the scaled
score the forward saw. Two sources, checked before anything runs:

* ``score_mod_grad(score, b, h, q_idx, kv_idx, *score_mod_args) -> float``, written by the
  user (any code Numba compiles: branches, comparisons, ``math.*``);
* automatic: the complex step ``f'(s) = Im f(s + i*eps) / eps`` with ``eps = 1e-30``, exact to
  rounding for a score_mod built from arithmetic, numpy's elementary functions (``np.exp``,
  ``np.tanh``, ``np.log``, ...) and table lookups (the dual-number rule: ``f(s + i*eps) =
  f(s) + i*eps*f'(s)`` up to ``eps**2``, which is zero in floating point). Numba compiles the
  user's function once more with a complex128 ``score``.

The automatic derivative is then compared with a central finite difference of the plain
Python function at a few scores and positions; a score_mod whose complex form is not its
derivative (``abs``, ``.real``, comparisons on the score) fails that check, as does one Numba
cannot compile for a complex score (``math.exp``), and both raise :class:`ModError` naming
``score_mod`` and asking for ``score_mod_grad``.

>>> import numpy as np
>>> from numba_attn import mod_grad
>>> def cap(s, b, h, i, j):
...     return 20.0 * np.tanh(s / 20.0)
>>> g = mod_grad.derivative(cap, None, (), np.float64)
>>> abs(float(g(1.0, 0, 0, 0, 0)) - (1.0 - float(np.tanh(0.05)) ** 2)) < 1e-15
True
"""
from __future__ import annotations

import inspect
import math
import weakref

import numba
import numpy as np
from numba.core import types
from numba.core.errors import NumbaError

from .mods import ModError, _arg_types, _dispatcher

__all__ = ["derivative", "check"]

_EPS = 1e-30
_I64 = (types.int64,) * 4
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # score_mod -> {key: g}


def _name(fn):
    fn = getattr(fn, "py_func", fn)
    return getattr(fn, "__qualname__", repr(fn))


def _complex_step(smod):
    """An njit ``g(score, b, h, i, j, *args)`` = Im smod(score + i*eps) / eps."""

    @numba.njit(error_model="numpy")
    def g(score, b, h, i, j, *args):
        z = smod(complex(np.float64(score), _EPS), b, h, i, j, *args)
        return np.float64(z.imag) * (1.0 / _EPS)

    return g


def _score_type(dtype):
    return types.float64 if np.dtype(dtype) == np.float64 else types.float32


def _compile_grad(score_mod, score_mod_grad, score_mod_args, dtype):
    args, tys = _arg_types("score_mod", score_mod_args)
    lead = (_score_type(dtype),) + _I64
    if score_mod_grad is not None:
        g = _dispatcher("score_mod_grad", score_mod_grad)
        try:
            inspect.signature(g.py_func).bind(*range(len(lead) + len(tys)))
        except TypeError:
            raise ModError(f"score_mod_grad: {_name(g)}{inspect.signature(g.py_func)} cannot "
                           f"take {len(lead) + len(tys)} positional arguments (score, b, h, "
                           f"q_idx, kv_idx and {len(tys)} score_mod_args)") from None
        try:
            g.compile(lead + tys)
        except NumbaError as e:
            raise ModError(f"score_mod_grad: {_name(g)} does not compile for the cpu kernel "
                           f"with argument types ({', '.join(map(str, lead + tys))}):\n{e}") \
                from None
        ret = g.overloads[lead + tys].signature.return_type
        if not isinstance(ret, (types.Float, types.Integer)) or isinstance(ret, types.Boolean):
            raise ModError(f"score_mod_grad: {_name(g)} returns {ret}; expected a float "
                           "(d score_mod / d score)")
        return g, args
    smod = _dispatcher("score_mod", score_mod)
    g = _complex_step(smod)
    try:  # g takes the user's arguments as *args: compiled with them as one star tuple
        g.compile(lead + (types.StarArgTuple.from_types(tys),))
    except NumbaError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        said = next((ln for ln in lines if ln.startswith(("No implementation", "Invalid use",
                                                         "Unknown attribute", "Cannot"))),
                    lines[0] if lines else "")
        raise ModError(
            f"score_mod: {_name(score_mod)} cannot be differentiated automatically (Numba "
            "cannot compile it for a complex score, as the automatic derivative needs; "
            "use numpy's functions, np.exp / np.tanh / np.log, rather than math's, and no "
            "comparisons on the score), so the backward needs score_mod_grad=(score, b, h, "
            "q_idx, kv_idx, *score_mod_args) -> d score_mod / d score; Numba said: "
            f"{said}") from None
    return g, args


def _probe_points(batch, num_heads, seqlen_q, seqlen_k):
    """A few (score, b, h, i, j) inside the problem, deterministic."""
    scores = (-2.75, -0.625, 0.3125, 1.375, 3.5)
    idx = []
    for n in (batch, num_heads, seqlen_q, seqlen_k):
        n = max(int(n), 1)
        idx.append(sorted({0, n // 2, n - 1}))
    pts = []
    for t, s in enumerate(scores):
        pts.append((s,) + tuple(ax[(t + a) % len(ax)] for a, ax in enumerate(idx)))
    return pts


def _finite_difference(f, s, b, h, i, j, args):
    """Five-point central difference of the plain Python ``f`` in float64."""
    step = 1e-3 * max(1.0, abs(s))

    def at(x):
        return float(f(float(x), b, h, i, j, *args))

    return (8.0 * (at(s + step) - at(s - step)) - (at(s + 2 * step) - at(s - 2 * step))) / (
        12.0 * step)


def check(score_mod, g, args, shape):
    """Compare the automatic derivative ``g`` with finite differences of the Python
    function at a few points of ``shape`` = (batch, heads, seqlen_q, seqlen_k)."""
    f = getattr(score_mod, "py_func", score_mod)
    for s, b, h, i, j in _probe_points(*shape):
        try:
            fd = _finite_difference(f, s, b, h, i, j, args)
        except Exception:  # noqa: BLE001 - a mod that only runs compiled: nothing to compare
            return
        auto = float(g(np.float64(s), b, h, i, j, *args))
        if not math.isfinite(fd):
            continue
        if not abs(auto - fd) <= 1e-4 * max(1.0, abs(fd)):
            raise ModError(
                f"score_mod: the automatic derivative of {_name(score_mod)} is {auto:.6g} at "
                f"score={s}, (b, h, q_idx, kv_idx)=({b}, {h}, {i}, {j}) but finite "
                f"differences give {fd:.6g} (abs, .real or comparisons on the score have no "
                "complex-step derivative); pass score_mod_grad=(score, b, h, q_idx, kv_idx, "
                "*score_mod_args) -> d score_mod / d score")


def derivative(score_mod, score_mod_grad, score_mod_args, dtype, shape=(1, 1, 1, 1)):
    """The compiled ``d score_mod / d score`` for the backward kernels (cached per function,
    argument types and dtype). Raises ModError naming ``score_mod`` / ``score_mod_grad``."""
    if score_mod_grad is not None and score_mod is None:
        raise ModError("score_mod_grad: given without score_mod")
    if score_mod is None:
        return None
    _dispatcher("score_mod", score_mod)  # a function (else ModError naming score_mod)
    if score_mod_grad is not None and not (inspect.isfunction(score_mod_grad) or isinstance(
            score_mod_grad, numba.core.registry.CPUDispatcher)):
        raise ModError(f"score_mod_grad: expected a Python function or a numba.njit "
                       f"function, got {type(score_mod_grad).__name__}")
    args, tys = _arg_types("score_mod", score_mod_args)
    # one compiled g per (function, derivative, argument types, dtype): the kernels are
    # specialised on g's identity, so a new g would mean a recompiled backward
    key = (score_mod_grad, tys, np.dtype(dtype).str)
    per = _CACHE.setdefault(getattr(score_mod, "py_func", score_mod), {})
    if key not in per:
        per[key] = (_compile_grad(score_mod, score_mod_grad, args, dtype)[0], set())
    g, checked = per[key]
    shape = tuple(int(n) for n in shape)
    if score_mod_grad is None and shape not in checked:
        check(score_mod, g, args, shape)
        checked.add(shape)
    return g
