"""Shared base class and helpers of numba_attn's asv suites.

A suite subclasses :class:`Benchmark`, sets ``params`` / ``param_names`` (each list ordered
smallest first: the suite test runs the first combination) and implements
``make(*params)``, which builds seeded inputs from ``self.rng`` and returns a callable
with no arguments. ``setup`` calls ``make`` and then the callable once, so JIT compilation
or on-disk cache loading is never timed. An unsupported combination raises
``NotImplementedError`` in ``make`` and asv skips it.

Benchmark methods are written out in each suite (``time_*``, ``peakmem_*``, ``track_*``)
and call ``self.fn()``.
"""
from __future__ import annotations

import sys

import numpy as np

SEED = 20240601

__all__ = ["SEED", "Benchmark", "require_torch", "peak_rss_increase", "nbytes"]


class Benchmark:
    """Base of every numba_attn benchmark class (asv finds the methods on subclasses)."""

    params: list = []
    param_names: list = []
    timeout = 600  # seconds, per benchmark
    warmup_time = 0.0  # setup already made the warm-up call
    # the parameter values the suite test runs (default: the first of each list)
    test_params: tuple | None = None

    def setup(self, *params):
        self.rng = np.random.default_rng(SEED)
        self.fn = self.make(*params)
        self.fn()  # warm-up: compile / cache load, thread pools, first-touch pages

    def make(self, *params):
        raise NotImplementedError(f"{type(self).__name__}.make is not written")


def require_torch():
    """Import torch or skip the benchmark (asv skips on NotImplementedError in setup)."""
    try:
        import torch
    except ImportError as e:
        raise NotImplementedError(f"torch peer skipped: {e}") from None
    return torch


def nbytes(*arrays):
    """Total bytes of numpy arrays (or anything with ``nbytes``)."""
    return int(sum(a.nbytes for a in arrays))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _malloc_trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_increase(fn):
    """Peak resident memory (bytes) that ``fn()`` adds above the RSS before the call.

    Linux only: trims the malloc heap, then resets the high-water mark with
    ``/proc/self/clear_refs``; returns ``nan`` elsewhere. Memory an allocator keeps
    mapped between calls (outside glibc's heap) can still be reused unseen, so this is a
    lower bound. The result of ``fn`` is kept alive until the peak is read, so the
    output counts.
    """
    if not sys.platform.startswith("linux"):
        return float("nan")
    _malloc_trim()  # hand freed heap back to the OS, so that reused pages count too
    try:
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        result = fn()
        peak = _status_kb("VmHWM")
    except OSError:
        return float("nan")
    del result
    return max(0, peak - before)
