"""Backend selection: the one step between a canonical Problem and the kernels.

``select(problem, backend, op)`` returns the backend that will run an operation
(``"forward"``, ``"backward"`` or ``"merge"``) or raises :class:`BackendUnavailable` with
every backend's reasons; :func:`run`, :func:`run_into`, :func:`backward` and :func:`merge`
run it. Validation
lives in :mod:`numba_attn.validate`, the Problem in :mod:`numba_attn.problem`, the
protocol and registry in :mod:`numba_attn.backends`.
"""
from __future__ import annotations

import numpy as np

from . import backends as _be
from .backends import (BACKEND_MODULES, BACKENDS, Backend, ReferenceBackend,  # noqa: F401
                       available_backends, get_backend, register_backend)
from .config import BackendUnavailable
from .interop import device_op
from .problem import CONTIGUOUS_BLOCK, Elementwise, Problem  # noqa: F401  (Problem: old home)
from .validate import array_device

# The helpers below moved to numba_attn.validate (checks) and numba_attn.problem; they stay
# importable from here for the modules that still read them as ``dispatch.<name>``.
from .validate import (BIAS_WHAT, MASK_WHAT, as_np_dtype, broadcast_4d,  # noqa: F401
                       check_alibi, check_float, check_int_vector, check_rank, check_sinks,
                       compute_dtype, host, host_operand, same, strided_operand)
from .interop import _bfloat16, _is_bfloat16  # noqa: F401

__all__ = ["select", "run", "run_into", "select_backward", "backward", "merge", "elementwise",
           "available_backends", "get_backend", "register_backend", "BACKENDS"]

_load_optional_backends = _be.load_all  # old name (tests, cache.py)


def _reasons(be, problem, op):
    why = be.unavailable_reason()
    return [why] if why else be.not_supported_reasons(problem, op)


def select(problem, backend="auto", op="forward"):
    """The backend that will run ``op`` on ``problem``, or an error listing why none can.

    ``"auto"`` runs where the data lives: the first of ``backends.AUTO_ORDER`` on the
    problem's device that serves it.
    """
    _be.load_all()
    if backend != "auto":
        be = get_backend(backend)
        reasons = _reasons(be, problem, op)
        if reasons:
            raise BackendUnavailable(f"backend {backend!r} cannot serve this call: "
                                     + "; ".join(reasons))
        return be
    tried = []
    for name in _be.AUTO_ORDER:
        be = BACKENDS.get(name)
        if be is None:
            continue
        if be.device != problem.device:  # auto runs where the data lives
            tried.append(f"{name}: data lives on {problem.device!r}, backend runs on "
                         f"{be.device!r}")
            continue
        reasons = _reasons(be, problem, op)
        if not reasons:
            return be
        tried.append(f"{name}: " + "; ".join(reasons))
    raise BackendUnavailable("no backend can serve this call:\n  " + "\n  ".join(tried))


def run(problem, backend="auto"):
    """Run ``problem`` on the chosen backend; returns (out, lse) in the compute dtype."""
    return select(problem, backend).run(problem)


def run_into(p, backend, out, out_shape):
    """Run; write into ``out`` (checked, or None: a new array of ``p.out_dtype``) reshaped
    to ``out_shape``; lse stays (Tq, H). Device ``out`` arrays are written on the device."""
    if out is not None and array_device(out) != "cpu":
        return device_op("run_into")(p, backend, out, out_shape)
    direct = (out is not None and out.flags.c_contiguous and out.dtype == p.compute_dtype
              and backend != "reference")
    if direct:
        p.extra["out_buffer"] = out.reshape(p.q.shape[0], p.config.num_heads,
                                            p.config.head_dim_v)
    o, lse = run(p, backend)
    if direct:
        return out, lse
    o = o.reshape(out_shape)
    if out is None:
        return (o if o.dtype == p.out_dtype else o.astype(p.out_dtype)), lse
    out[...] = o
    return out, lse


def select_backward(p, backend="auto", data_device="cpu"):
    """The backend for the backward of ``p`` (its Problem holds host arrays).

    Device inputs (``data_device="cuda"``) are staged through the host for now: ``"auto"``
    picks the CUDA kernels for them, and only ``"auto"`` / ``"cuda"`` can serve them.
    """
    if data_device != "cpu":
        if backend not in ("auto", "cuda"):
            raise BackendUnavailable(f"backend {backend!r} cannot serve device arrays; use "
                                     "'auto' or 'cuda'")
        backend = "cuda"
    return select(p, backend, op="backward")


def backward(p, be, dout, out, lse, dropout_p, seed, bias_shape):
    """Gradients of ``p`` on backend ``be`` (from :func:`select_backward`): host arrays,
    packed (dout/out (Tq, H, Dv), lse (Tq, H)) -> (dq, dk, dv, dbias or None, dsinks or
    None)."""
    cdt = p.compute_dtype
    return be.backward(p, dout.astype(cdt, copy=False), out.astype(cdt, copy=False),
                       np.ascontiguousarray(lse, dtype=cdt), dropout_p, seed, bias_shape)


def elementwise(op, x):
    """The backend that runs elementwise ``op`` (``"rotary"``, ``"norm"``) where ``x``
    lives (``"auto"``: host arrays the CPU kernels, device arrays the CUDA ones)."""
    return select(Elementwise(array_device(x)), "auto", op=op)


def merge(out_a, lse_a, out_b, lse_b, device, backend="auto"):
    """merge_states on the chosen backend: operands from ``problem.merge_operands`` (out
    (lead, S, H, Dv), lse (lead, H, S), on ``device``) -> (out, lse) in the compute dtype."""
    return select(Elementwise(device), backend, op="merge").merge(out_a, lse_a, out_b, lse_b)
