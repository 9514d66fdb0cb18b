"""torch autograd through numba_attn: ``attention`` / ``attention_varlen`` on torch CPU
tensors that require grad return tensors with a ``grad_fn``.

One ``torch.autograd.Function`` for both entry points runs the numpy forward on detached views
and saves only its inputs, ``out`` and ``lse`` (what FlashAttention saves); its backward
is :func:`numba_attn.attention_backward` / ``attention_varlen_backward`` with the forward's
own options, so ``loss.backward()`` flows through numba_attn like through torch's SDPA.
Gradients reach q, k, v, a float ``bias`` and ``sinks`` (when they require grad); ``lse``
(``return_lse=True``) comes back non-differentiable. torch is never imported here: the
Function classes are built on the first tensor that needs them, from ``sys.modules``.
"""
from __future__ import annotations

import sys

import numpy as np

from .config import AttentionError
from .interop import is_torch

__all__ = ["wants_grad", "attention", "attention_varlen", "register", "vjp_options"]

# forward and backward of each entry point, registered by functional.py and backward.py
# (they sit above this module: importing them here would be a cycle)
_IMPL: dict = {}


def register(kind: str, **fns) -> None:
    """Record ``forward=`` / ``backward=`` of entry point ``kind`` for the Functions.

    >>> from numba_attn import autograd
    >>> sorted(autograd._IMPL["attention"])
    ['backward', 'forward']
    """
    _IMPL.setdefault(kind, {}).update(fns)


def _probe(q, k, rows):
    """(compute dtype, (batch, heads, seqlen_q, seqlen_k)) of a call, for mod_grad's check
    of an automatic score_mod derivative (positions inside the problem)."""
    dt = np.float64 if str(getattr(q, "dtype", "")).endswith("float64") else np.float32
    if rows:  # varlen: (total, heads, dim) with cu_seqlens
        cq, ck = (np.asarray(c).astype(np.int64) for c in rows)
        return dt, (max(len(cq) - 1, 1), q.shape[1], int(np.diff(cq).max(initial=1)),
                    int(np.diff(ck).max(initial=1)))
    return dt, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])


def vjp_options(opts, fn_name, probe=None):
    """The forward options a vjp keeps, checked before anything runs: (forward options,
    backward options). ``probe`` = :func:`_probe` of the call: a score_mod's derivative
    (``score_mod_grad`` or the automatic one) is compiled and checked here, so a mod without
    one fails before the forward runs."""
    for name in ("return_lse", "out"):
        if name in opts:
            raise TypeError(f"{fn_name}() got an unexpected keyword argument {name!r} (the "
                            "vjp keeps out and lse itself)")
    opts = dict(opts)
    grad = opts.pop("score_mod_grad", None)
    if opts.get("score_mod") is not None and probe is not None and \
            opts.get("backend", "auto") != "reference":
        from . import mod_grad

        mod_grad.derivative(opts["score_mod"], grad, opts.get("score_mod_args", ()),
                            probe[0], probe[1])
    elif grad is not None and opts.get("score_mod") is None:
        from .mods import ModError

        raise ModError("score_mod_grad: given without score_mod")
    if float(opts.get("dropout_p", 0.0) or 0.0) > 0.0 and opts.get("seed") is None:
        # the one seed both passes use: the vjp owns it, so it cannot go missing
        opts["seed"] = int(np.random.SeedSequence().entropy % (1 << 63))
    bwd = dict(opts)
    if grad is not None:
        bwd["score_mod_grad"] = grad
    return opts, bwd


def wants_grad(*xs) -> bool:
    """True when some argument is a torch tensor requiring grad and grad mode is on.

    >>> import numpy as np
    >>> from numba_attn.autograd import wants_grad
    >>> wants_grad(np.zeros(2), None)
    False
    """
    if not any(is_torch(x) for x in xs):
        return False
    torch = sys.modules["torch"]
    return torch.is_grad_enabled() and any(is_torch(x) and x.requires_grad for x in xs)


_FUNCTIONS: dict = {}


def _detach(x):
    return x.detach() if is_torch(x) else x


def _grad_or_none(x, need, g):
    return g if need and is_torch(x) else None


def _functions():
    """The Function class, built once torch has been imported by the caller."""
    if _FUNCTIONS:
        return _FUNCTIONS
    torch = sys.modules["torch"]

    class Attention(torch.autograd.Function):
        """attention (rows = ()) or attention_varlen (rows = (cu_seqlens_q, cu_seqlens_k))."""

        @staticmethod
        def forward(ctx, kind, opts, rows, q, k, v, bias, sinks):
            out, lse = _IMPL[kind]["forward"](q.detach(), k.detach(), v.detach(), *rows,
                                              bias=_detach(bias), sinks=_detach(sinks),
                                              return_lse=True, **opts[0])
            ctx.kind, ctx.opts, ctx.rows = kind, opts[1], rows
            ctx.save_for_backward(q, k, v, out, lse, bias, sinks)
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse, bias, sinks = ctx.saved_tensors
            need = ctx.needs_input_grad[3:]  # q, k, v, bias, sinks
            want_db = bool(need[3]) and bias is not None
            want_ds = bool(need[4]) and sinks is not None
            g = list(_IMPL[ctx.kind]["backward"](
                dout.detach(), q.detach(), k.detach(), v.detach(), out, lse, *ctx.rows,
                bias=_detach(bias), sinks=_detach(sinks), return_dbias=want_db,
                return_dsinks=want_ds, **ctx.opts))
            dbias = g.pop(3) if want_db else None
            dsinks = g.pop(3) if want_ds else None
            return (None, None, None, g[0] if need[0] else None, g[1] if need[1] else None,
                    g[2] if need[2] else None, dbias, dsinks)

    _FUNCTIONS.update(function=Attention)
    return _FUNCTIONS


def _check(opts, out, probe):
    """(forward options, backward options), checked before anything runs."""
    if out is not None:
        raise AttentionError("out: not supported when an input requires grad (autograd "
                             "needs a fresh output tensor)")
    return vjp_options(opts, "attention", probe)


def _promote(x, ref):
    """A numpy/None bias or sinks next to torch inputs: as a tensor (no grad)."""
    if x is None or is_torch(x):
        return x
    torch = sys.modules["torch"]
    return torch.from_numpy(np.asarray(x))


def attention(q, k, v, *, bias=None, sinks=None, return_lse=False, out=None, **opts):
    """:func:`numba_attn.attention` with a ``grad_fn`` (called by it for tensors that
    require grad); same arguments.

    >>> from numba_attn.autograd import attention
    >>> attention.__name__
    'attention'
    """
    opts = _check(opts, out, _probe(q, k, ()))
    o, lse = _functions()["function"].apply("attention", opts, (), q, k, v,
                                            _promote(bias, q), _promote(sinks, q))
    return (o, lse) if return_lse else o


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, bias=None, sinks=None,
                     return_lse=False, out=None, **opts):
    """:func:`numba_attn.attention_varlen` with a ``grad_fn``; same arguments.

    >>> from numba_attn.autograd import attention_varlen
    >>> attention_varlen.__name__
    'attention_varlen'
    """
    opts = _check(opts, out, _probe(q, k, (cu_seqlens_q, cu_seqlens_k)))
    o, lse = _functions()["function"].apply("attention_varlen", opts,
                                            (cu_seqlens_q, cu_seqlens_k), q, k, v,
                                            _promote(bias, q), _promote(sinks, q))
    return (o, lse) if return_lse else o
