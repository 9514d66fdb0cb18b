"""Keep numpy's OpenBLAS worker threads from holding the cores during attention.

After each multi-threaded call, OpenBLAS's workers spin (busy-wait) for a while
(``OPENBLAS_THREAD_TIMEOUT``, about 0.1 s by default) before they sleep. A Numba parallel
kernel started in that window shares its cores with them: a 4k decode step ran 3.6-20x
slower right after a 512 x 512 numpy matmul on a 2-core machine. Setting the environment
variable only helps when it is set before numpy loads OpenBLAS, which scripts rarely
arrange.

:func:`quiet` stops those workers before a parallel kernel: it calls OpenBLAS's own
``blas_thread_shutdown_`` (what OpenBLAS runs itself around ``fork``) in every OpenBLAS
library loaded in the process, numpy's and SciPy's bundled copies included. OpenBLAS
starts its workers again on its next threaded call (tens of microseconds, once per
numpy call that follows). Set ``NUMBA_ATTN_QUIET_BLAS=0`` to leave BLAS alone.

Linux only (libraries are found in ``/proc/self/maps``); a no-op elsewhere.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

_lock = threading.Lock()
_state = {"modules": -1, "fns": ()}


def _find():
    """``blas_thread_shutdown_`` of each loaded OpenBLAS (numpy's scipy_openblas, SciPy's,
    a system libopenblas)."""
    fns = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return ()
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 4))  # already loaded
            fn = lib.blas_thread_shutdown_
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = []
        fns.append(fn)
    return tuple(fns)


def quiet():
    """Stop the worker threads of every loaded OpenBLAS (they restart on demand)."""
    if os.environ.get("NUMBA_ATTN_QUIET_BLAS", "1") == "0" or not sys.platform.startswith("linux"):
        return
    n = len(sys.modules)
    if n != _state["modules"]:  # a new import may have loaded another OpenBLAS
        with _lock:
            _state["fns"] = _find()
            _state["modules"] = n
    for fn in _state["fns"]:
        fn()
