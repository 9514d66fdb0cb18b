"""Warp shuffles for the CUDA simulator (test-only; the real kernels are never changed).

numba-cuda's simulator runs each CUDA thread as a Python thread but has no
``shfl_*_sync`` / ``syncwarp``, and its libdevice functions are stubs returning None
(``int_as_float`` / ``float_as_int``, the bfloat16 bit casts, are supplied here). Here
each warp of a simulated block gets a barrier and a slot per lane: a shuffle publishes the
lane's value, waits for the whole warp and reads the source lane's slot (slots alternate
between two buffers, see ``_exchange``). Like the hardware, this needs every lane of the
warp to take part (converged warps).
"""
from __future__ import annotations

import threading

import numpy as np

WARP = 32
_lock = threading.Lock()
TIMEOUT_S = 120.0  # a broken kernel raises instead of hanging the test run


class _Warp:
    def __init__(self, n):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=TIMEOUT_S)
        self.slots = ([None] * n, [None] * n)  # double-buffered by round parity


def _warp():
    t = threading.current_thread()
    mgr = t._manager
    wid = t.thread_id // WARP
    with _lock:
        warps = mgr.__dict__.setdefault("_shim_warps", {})
        w = warps.get(wid)
        if w is None:
            nthreads = int(np.prod(mgr._block_dim))
            w = warps[wid] = _Warp(min(WARP, nthreads - wid * WARP))
    return w, t


def _exchange(value, src_of):
    """One barrier per shuffle: round n + 2 reuses round n's slots only after every lane
    has passed round n + 1's barrier, i.e. finished reading round n."""
    w, t = _warp()
    lane = t.thread_id % WARP
    rnd = getattr(t, "_shim_round", 0)
    t._shim_round = rnd + 1
    slots = w.slots[rnd & 1]
    slots[lane] = value
    w.barrier.wait()
    src = src_of(lane)
    return slots[src] if 0 <= src < w.n else value


def shfl_sync(self, mask, value, src_lane):
    return _exchange(value, lambda lane: int(src_lane) % WARP)


def shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(value, lambda lane: lane ^ int(lane_mask))


def shfl_up_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane - int(delta) if lane >= int(delta) else lane)


def shfl_down_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane + int(delta))


def syncwarp(self, mask=0xFFFFFFFF):
    _warp()[0].barrier.wait()


def int_as_float(x):
    """libdevice ``__nv_int_as_float``: the float32 with these 32 bits."""
    return np.array(int(x) & 0xFFFFFFFF, np.uint32).view(np.float32)[()]


def float_as_int(x):
    """libdevice ``__nv_float_as_int``: the bits of a float32, as an int32."""
    return np.array(x, np.float32).view(np.int32)[()]


def install():
    """Add the warp primitives to the simulator's fake ``cuda`` module and the bit casts
    to the (stub-only under the simulator) libdevice module (idempotent)."""
    from numba.cuda import libdevice
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    libdevice.int_as_float = int_as_float
    libdevice.float_as_int = float_as_int

    for name, fn in (("shfl_sync", shfl_sync), ("shfl_xor_sync", shfl_xor_sync),
                     ("shfl_up_sync", shfl_up_sync), ("shfl_down_sync", shfl_down_sync),
                     ("syncwarp", syncwarp)):
        if not hasattr(FakeCUDAModule, name):
            setattr(FakeCUDAModule, name, fn)
