"""The one place that sets Numba options for numba_attn's CPU kernels.

``cache=True`` so a warm on-disk cache makes start-up cheap; fastmath flags that stay
correct with ``-inf`` masking (no ``nnan``/``ninf``); ``error_model="numpy"`` so that
division does not branch on zero checks.
"""
from __future__ import annotations

import os

import numba
import numba.extending


def _threadsafe_layer_available() -> bool:
    import importlib

    for mod in ("numba.np.ufunc.omppool", "numba.np.ufunc.tbbpool"):
        try:
            importlib.import_module(mod)
            return True
        except Exception:  # ImportError, OSError for a missing libgomp/libtbb
            pass
    return False


# A call from several Python threads, or one made while another parallel region runs,
# aborts the process under Numba's default "workqueue" layer: ask for a thread-safe one
# (OpenMP or TBB) unless the user chose a layer explicitly. Takes effect if no parallel
# region has run yet in this process.
if (
    "NUMBA_THREADING_LAYER" not in os.environ
    and numba.config.THREADING_LAYER == "default"
    and _threadsafe_layer_available()
):
    numba.config.THREADING_LAYER = "threadsafe"

FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

_OPTIONS = dict(nogil=True, cache=True, error_model="numpy")


def jit(fn=None, *, parallel=False):
    """``numba.njit`` with numba_attn's options; ``parallel=True`` for prange kernels."""
    def wrap(f):
        return numba.njit(parallel=parallel, fastmath=set(FASTMATH), **_OPTIONS)(f)
    return wrap if fn is None else wrap(fn)


def inline(fn):
    """A helper compiled into its callers (``register_jitable``): no separate dispatch."""
    return numba.extending.register_jitable(fn)


class serial_if:
    """Run the parallel kernels of this block on the calling thread alone when ``small``.

    A parallel region waits for every worker; on a busy machine (BLAS threads of the
    caller's own numpy, other processes) a worker can be a scheduler slice late, which
    costs more than a tiny kernel itself. ``numba.set_num_threads`` is thread-local.
    """

    def __init__(self, small):
        self.small = small
        self.saved = None

    def __enter__(self):
        if self.small:
            self.saved = numba.get_num_threads()
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            numba.set_num_threads(self.saved)
