"""Host activations to the device and back for a layer whose attention runs on CUDA
(``backend="cuda"`` or a device cache): the projections stay on the host.
"""
from __future__ import annotations

import numpy as np

from .. import dispatch as dp
from ..config import BackendUnavailable

__all__ = ["to_device_if", "require_cuda", "to_host"]


def to_device_if(backend, *arrays):
    """Host arrays -> CUDA device arrays when ``backend == "cuda"`` (else unchanged)."""
    if backend != "cuda":
        return arrays
    require_cuda()
    from numba import cuda

    return tuple(None if a is None else cuda.to_device(np.ascontiguousarray(a))
                 for a in arrays)


def require_cuda():
    """Raise BackendUnavailable (with the reason) when the CUDA backend cannot serve."""
    reason = dp.available_backends().get("cuda", "the CUDA backend is not registered")
    if reason:
        raise BackendUnavailable(f"backend 'cuda' cannot serve this call: {reason}")


def to_host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)
