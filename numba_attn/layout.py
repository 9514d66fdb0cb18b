"""Array layouts of the public entry points: ``"bshd"`` (numba_attn's and FlashAttention's
(batch, seq, heads, dim), the default) or ``"bhsd"`` (torch's (batch, heads, seq, dim)).

The kernels read one canonical layout, so every entry point calls :func:`inputs` once at
the top (its q/k/v-like arguments become (..., seq, heads, dim) views: axes -3 and -2
swapped, no copy) and :func:`output` once on what it returns (the first result swapped
back, again a view: a transposed view of the kernel's C-contiguous result). The same rule
serves the 4-D batched arrays and the 3-D packed rows of the varlen form ((total, heads,
dim) <-> (heads, total, dim)). numpy arrays, torch tensors (autograd follows the
transpose) and CuPy arrays are swapped by their own methods.

Reading a (batch, heads, seq, dim) array as BSHD is silently wrong whenever the head
counts happen to fit, so :func:`inputs` also checks the head counts of q against k (or
against the cache's ``num_kv_heads``): when they do not fit in the given layout but would
in the other one, the error says which layout to pass.
"""
from __future__ import annotations

from .config import AttentionError

__all__ = ["LAYOUTS", "check_layout", "inputs", "output"]

LAYOUTS = ("bshd", "bhsd")


def check_layout(layout) -> str:
    """``layout`` checked: "bshd" or "bhsd".

    >>> from numba_attn.layout import check_layout
    >>> check_layout("bhsd")
    'bhsd'
    """
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise AttentionError(f"layout: expected 'bshd' (batch, seq, heads, dim) or 'bhsd' "
                             f"(batch, heads, seq, dim), got {layout!r}")
    return layout


def _swap(name, x):
    """``x`` with axes -3 and -2 swapped, as a view; None stays None."""
    if x is None:
        return None
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 3:
        return x  # the entry point's own rank check names it
    n = len(shape)
    if hasattr(x, "transpose") and type(x).__module__.split(".")[0] == "torch":
        return x.transpose(n - 3, n - 2)
    if hasattr(x, "swapaxes"):  # numpy, CuPy
        return x.swapaxes(n - 3, n - 2)
    raise AttentionError(f"{name}: layout='bhsd' needs an array with swapaxes/transpose "
                         f"(numpy, torch, CuPy), got {type(x).__name__}; pass it as "
                         f"(batch, seq, heads, dim) with layout='bshd'")


def _heads(x, axis):
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 3:
        return None
    return int(shape[len(shape) + axis])


def _fits(hq, hk):
    return hq is not None and hk is not None and hk > 0 and hk <= hq and hq % hk == 0


def check_heads(layout, q, k=None, num_kv_heads=None, arg="k"):
    """Raise when q's head count does not fit k's (or ``num_kv_heads``) in ``layout`` but
    would in the other layout: the error names the layout to pass. Silent otherwise (the
    entry point's own checks report every other misfit)."""
    here, other = (-2, -3) if layout == "bshd" else (-3, -2)
    if num_kv_heads is not None:
        hq, hk = _heads(q, here), int(num_kv_heads)
        hq2, hk2 = _heads(q, other), hk
    else:
        hq, hk, hq2, hk2 = _heads(q, here), _heads(k, here), _heads(q, other), _heads(k, other)
    if hq is None or hk is None or _fits(hq, hk) or not _fits(hq2, hk2):
        return
    n = len(q.shape)
    names = "(batch, seq, heads, dim)" if n == 4 else "(total, heads, dim)"
    swapped = "(batch, heads, seq, dim)" if n == 4 else "(heads, total, dim)"
    if layout == "bshd":
        hint = f"if your arrays are {swapped}, pass layout='bhsd'"
        read = names
    else:
        hint = f"if your arrays are {names}, pass layout='bshd' (the default)"
        read = swapped
    what = f"{arg} has {hk} heads" if num_kv_heads is None else f"the cache has {hk} kv heads"
    raise AttentionError(f"q: read as {read} (layout={layout!r}) it has {hq} heads and {what},"
                         f" which is not a multiple (num_heads % num_kv_heads must be 0); "
                         f"{hint}")


def inputs(layout, q, k=None, *rest, num_kv_heads=None, arg="k"):
    """The canonical (..., seq, heads, dim) views of ``q, k, *rest`` (None stays None),
    after :func:`check_heads`. With "bshd" the arrays come back as they are.

    >>> import numpy as np
    >>> from numba_attn.layout import inputs
    >>> q = np.zeros((2, 8, 5, 16))                     # (batch, heads, seq, dim)
    >>> qs, ks = inputs("bhsd", q, np.zeros((2, 2, 7, 16)))
    >>> qs.shape, ks.shape, np.shares_memory(qs, q)
    ((2, 5, 8, 16), (2, 7, 2, 16), True)
    """
    check_layout(layout)
    check_heads(layout, q, k, num_kv_heads, arg)
    arrays = (q, k) + rest
    if layout == "bshd":
        return arrays
    names = ("q", arg) + tuple(f"arg{i}" for i in range(len(rest)))
    return tuple(_swap(n, x) for n, x in zip(names, arrays))


def output(layout, res):
    """``res`` (an array, or a tuple whose first item is the output) in ``layout``: the
    output swapped back to (batch, heads, seq, dim) for "bhsd" (a view), the rest as is.

    >>> import numpy as np
    >>> from numba_attn.layout import output
    >>> o, lse = output("bhsd", (np.zeros((2, 5, 8, 16)), np.zeros((2, 8, 5))))
    >>> o.shape, lse.shape
    ((2, 8, 5, 16), (2, 8, 5))
    """
    if layout == "bshd":
        return res
    if isinstance(res, tuple):
        return (_swap("out", res[0]),) + res[1:]
    return _swap("out", res)


def grads(layout, res, n=3):
    """Gradients in ``layout``: the first ``n`` items of ``res`` (dq, dk, dv) swapped back,
    the rest (dbias, dsinks) as they are."""
    if layout == "bshd":
        return res
    return tuple(_swap("grad", g) for g in res[:n]) + tuple(res[n:])


def entry(*names, kv="k", result="out"):
    """Decorator of a public entry point with a ``layout="bshd"`` keyword.

    ``names`` are the arguments in the (..., seq, heads, dim) family (swapped for "bhsd",
    None allowed); ``kv`` names the argument whose heads q's must fit (``"cache"``: its
    ``num_kv_heads``); ``result`` says what comes back: ``"out"`` (an output, or a tuple
    led by it), ``"grads"`` (dq, dk, dv, then the rest) or ``"vjp"`` ((out, vjp) with
    ``vjp(dout)`` in the layout too). With the default layout the function is called as
    it is: the decorator costs one dict lookup.
    """
    import functools
    import inspect

    def wrap(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters)
        iq = params.index(names[0])
        ik = params.index(kv)

        def arg(args, kwargs, i, name):
            return args[i] if len(args) > i else kwargs.get(name)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            layout = kwargs.get("layout", "bshd")
            q, other = arg(args, kwargs, iq, names[0]), arg(args, kwargs, ik, kv)
            if layout == "bshd":  # the common case first: head counts that fit, no copy
                try:
                    hq = q.shape[-2]
                    hk = other.num_kv_heads if kv == "cache" else other.shape[-2]
                    if 0 < hk <= hq and hq % hk == 0:
                        return fn(*args, **kwargs)
                except (AttributeError, IndexError, TypeError):
                    pass
            if kv == "cache":
                check_heads(check_layout(layout), q,
                            num_kv_heads=getattr(other, "num_kv_heads", None))
            else:
                check_heads(check_layout(layout), q, other, arg=kv)
            if layout == "bshd":
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            a = bound.arguments
            for n in names:
                if n in a:
                    a[n] = _swap(n, a[n])
            if "layout" in a:
                a["layout"] = "bshd"
            else:  # a **options entry point: the inner calls get the default layout
                next(a[n] for n, prm in sig.parameters.items()
                     if prm.kind is prm.VAR_KEYWORD).pop("layout", None)
            res = fn(*bound.args, **bound.kwargs)
            if result == "grads":
                return grads(layout, res)
            if result == "vjp":
                out, vjp = res

                def vjp_in_layout(dout):
                    return grads(layout, vjp(_swap("dout", dout)))

                return _swap("out", out), vjp_in_layout
            return output(layout, res)

        return call

    return wrap
