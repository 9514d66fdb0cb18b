"""The backend protocol and the registry (backends found lazily, by module path).

A backend says what it serves: ``operations`` (``"forward"``, ``"backward"``,
``"merge"``), the
``device`` its kernels run on, ``unavailable_reason()`` (None when it can run at all) and
``not_supported_reasons(problem, op)`` (empty when it can run this problem), xformers
style, so a refusal always comes with its reasons. ``numba_attn.cpu`` and
``numba_attn.cuda`` define and register theirs on import; this module never imports them
(:data:`BACKEND_MODULES` names them by path), so there is no import cycle and no CUDA
import on a CPU-only call.
"""
from __future__ import annotations

import importlib
import threading

from .config import AttentionError

__all__ = ["Backend", "ReferenceBackend", "BACKENDS", "BACKEND_MODULES", "AUTO_ORDER",
           "register_backend", "get_backend", "load_all", "available_backends"]


class Backend:
    """What a backend must say and do.

    ``run(problem)`` -> (out (Tq, H, Dv), lse (Tq, H)) in the compute dtype (the dropout
    forward too, when ``problem.extra["dropout"]`` is set);
    ``backward(problem, dout, out, lse, dropout_p, seed, bias_shape)`` -> (dq, dk, dv,
    dbias or None, dsinks or None) in the packed shapes of q, k, v;
    ``merge(out_a, lse_a, out_b, lse_b)`` -> (out, lse) of ``merge_states`` over out
    (lead, S, H, Dv) and lse (lead, H, S) in the compute dtype (its "problem" for
    ``not_supported_reasons`` is a ``problem.Elementwise``: only a device);
    ``rotary(x, cos, sin, pos, interleaved, out)`` -> x (T, H, D) rotated at int64 ``pos``
    (T,), on x's device (operation ``"rotary"``, an Elementwise problem too);
    ``rms_norm(x, weight, eps, out)`` -> ``numba_attn.rms_norm``'s result, on x's device
    (operation ``"norm"``; ``out`` already checked by ``validate.check_norm_out``).
    """

    name = "?"
    device = "cpu"
    operations = frozenset({"forward"})
    # the backward of a score_mod needs d score_mod / d score compiled beside it
    # (numba_attn.mod_grad), attached to the Problem's mods before it runs
    needs_score_mod_grad = True
    # reads 8-bit KV-cache storage with the cache's scales (``problem.extra["kv_scales"]``);
    # a backend that does not is given dequantized float32 copies
    reads_quantized_kv = False

    def unavailable_reason(self):
        return None

    def not_supported_reasons(self, problem, op="forward") -> list:
        reasons = []
        if op not in self.operations:
            reasons.append(f"the {self.name} backend has no {op}")
        if problem.device != self.device:
            reasons.append(f"data lives on {problem.device!r}, backend runs on {self.device!r}")
        return reasons

    def run(self, problem):
        raise NotImplementedError

    def backward(self, problem, dout, out, lse, dropout_p, seed, bias_shape):
        raise NotImplementedError

    def merge(self, out_a, lse_a, out_b, lse_b):
        raise NotImplementedError

    def rotary(self, x, cos, sin, pos, interleaved, out):
        raise NotImplementedError

    def rms_norm(self, x, weight, eps, out):
        raise NotImplementedError


class ReferenceBackend(Backend):
    """reference.py in float64 (tests, debugging); copies device data to the host."""

    name = "reference"
    device = "cpu"
    operations = frozenset({"forward", "backward", "merge"})
    needs_score_mod_grad = False  # the oracle differentiates the Python mod itself

    def not_supported_reasons(self, problem, op="forward"):
        if op == "merge" and problem.device != "cpu":
            return ["merge_states: the reference backend merges host arrays"]
        return []

    # backward: the public function puts the oracle over the caller's own arrays (the
    # reference backward of its entry point) on ``problem.extra["oracle"]``

    def run(self, problem):
        from .reference_problem import run_problem

        return run_problem(problem)

    def backward(self, problem, dout, out, lse, dropout_p, seed, bias_shape):
        return problem.extra["oracle"]()

    def merge(self, out_a, lse_a, out_b, lse_b):
        from .reference import merge_states

        o, lse = merge_states(out_a, lse_a, out_b, lse_b)
        return o.astype(out_a.dtype), lse.astype(lse_a.dtype)


BACKEND_MODULES = {"cpu": "numba_attn.cpu", "cuda": "numba_attn.cuda"}
BACKENDS = {"reference": ReferenceBackend()}
AUTO_ORDER = ("cuda", "cpu")


def register_backend(backend):
    """Add a backend (numba_attn.cpu and numba_attn.cuda register theirs on import)."""
    BACKENDS[backend.name] = backend


def _load(name):
    """Import the module of backend ``name`` (by path) when it is not registered yet."""
    if name not in BACKENDS and name in BACKEND_MODULES:
        try:
            importlib.import_module(BACKEND_MODULES[name])
        except ImportError:
            if name == "cpu":
                raise
    return BACKENDS.get(name)


def get_backend(name):
    be = _load(name) if isinstance(name, str) else None
    if be is None:
        raise AttentionError(f"backend: unknown {name!r}; expected 'auto' or one of "
                             f"{sorted(set(BACKENDS) | set(BACKEND_MODULES))}")
    return be


_loaded = threading.Event()


def load_all():
    """Import every backend module once (auto selection and available_backends need all)."""
    if _loaded.is_set():
        return
    for name in BACKEND_MODULES:
        _load(name)
    _loaded.set()


def available_backends() -> dict:
    """``{name: None}`` for each usable backend, ``{name: "reason"}`` for the others.

    Every known backend is listed, the unusable ones with the reason (so a missing CUDA
    says what to install); ``[n for n, why in available_backends().items() if why is
    None]`` are the usable ones.

    Examples
    --------
    >>> import numba_attn
    >>> reasons = numba_attn.available_backends()
    >>> reasons["cpu"] is None and reasons["reference"] is None
    True
    >>> sorted(reasons)[:2]
    ['cpu', 'cuda']
    """
    load_all()
    return {name: b.unavailable_reason() for name, b in BACKENDS.items()}
