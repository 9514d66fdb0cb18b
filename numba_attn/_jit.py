"""The one place that sets Numba options for numba_attn's CPU kernels.

``cache=True`` so a warm on-disk cache makes start-up cheap; fastmath flags that stay
correct with ``-inf`` masking (no ``nnan``/``ninf``); ``error_model="numpy"`` so that
division does not branch on zero checks.
"""
from __future__ import annotations

import threading

import numba
import numba.extending

# Threading layer: Numba's default priority (tbb, omp, workqueue) already picks a
# thread-safe layer where one is installed. numba_attn does not force one, and in
# particular does not load OpenMP at import: whichever libgomp is loaded first serves every
# library in the process, and pre-loading the system one before torch was imported made
# torch's own OpenMP kernels 3-4x slower after our first parallel call (measured here).
# Where only "workqueue" exists, which aborts on concurrent parallel calls, calls are
# serialised through a lock instead (see ``parallel_guard``).
_workqueue_lock = threading.Lock()


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()


def parallel_guard():
    """A lock for the duration of a parallel kernel call when the layer is "workqueue"."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet: be safe
        return _workqueue_lock
    return _workqueue_lock if layer == "workqueue" else _NO_LOCK


FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

_OPTIONS = dict(nogil=True, cache=True, error_model="numpy")


def jit(fn=None, *, parallel=False, cache=True):
    """``numba.njit`` with numba_attn's options; ``parallel=True`` for prange kernels.

    ``cache=False`` for kernels specialised on user functions (numba_attn.mods): their
    signatures hold function objects, so an on-disk entry could never be loaded again.
    """
    def wrap(f):
        return numba.njit(parallel=parallel, fastmath=set(FASTMATH),
                          **dict(_OPTIONS, cache=cache))(f)
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
