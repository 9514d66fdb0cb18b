"""bfloat16 on the device: arrays travel as their uint16 bits, kernels convert in registers.

Numba has no bfloat16 array type, so a bfloat16 device array (``ml_dtypes.bfloat16``
numba device array, or a torch CUDA ``bfloat16`` tensor) is handed to the kernels as a
``uint16`` view of the same memory. :func:`load` widens the bits to float32 (the bits are
the high half of a float32: a shift and a register move, ``shl.b32`` + ``mov.b32`` in the
PTX); :func:`store` rounds a float32 to the nearest bfloat16 (ties to even, NaN kept NaN).
Kernels that read or write storage take their load/store functions at build time
(:func:`loader`, :func:`storer`), so the float16/32/64 kernels are unchanged.

Under the CUDA simulator libdevice is only a stub: the tests' ``sim_shim`` supplies
``int_as_float`` / ``float_as_int`` there (test-only, as for the warp shuffles).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda
from numba.cuda import libdevice

from ..interop import _bfloat16, _is_bfloat16

__all__ = ["is_bf16", "bits", "from_bits", "load", "store", "loader", "storer", "BITS"]

BITS = np.dtype(np.uint16)
is_bf16 = _is_bfloat16  # whether a dtype (numpy/ml_dtypes, torch) is bfloat16: one lookup


def bits(x):
    """The uint16 view (a numba device array) of a bfloat16 device array; other device
    arrays are returned as numba device arrays, unchanged."""
    if type(x).__module__.split(".")[0] == "torch" and is_bf16(x.dtype):
        import torch  # a torch CUDA bfloat16 tensor exports no __cuda_array_interface__

        return cuda.as_cuda_array(x.view(torch.int16)).view(BITS)
    if not hasattr(x, "copy_to_host"):
        x = cuda.as_cuda_array(x)
    return x.view(BITS) if is_bf16(x.dtype) else x


def from_bits(x):
    """A uint16 device array seen as bfloat16 (same memory)."""
    bf = _bfloat16()
    if bf is None:
        raise TypeError("bfloat16 device arrays need ml_dtypes (pip install ml_dtypes), or "
                        "cast to float16 / float32 on the device")
    return x.view(bf)


@cuda.jit(device=True, inline=True)
def load(u):
    """bfloat16 bits (uint16) -> float32, exactly."""
    return libdevice.int_as_float(numba.int32(numba.uint32(u) << numba.uint32(16)))


@cuda.jit(device=True, inline=True)
def store(x):
    """float32 -> bfloat16 bits, round to nearest, ties to even; NaN stays a quiet NaN."""
    b = numba.uint32(libdevice.float_as_int(numba.float32(x)))
    if math.isnan(x):
        return numba.uint16(0x7FC0)
    b = b + numba.uint32(0x7FFF) + ((b >> numba.uint32(16)) & numba.uint32(1))
    return numba.uint16(b >> numba.uint32(16))


@cuda.jit(device=True, inline=True)
def _to32(x):
    return numba.float32(x)


@cuda.jit(device=True, inline=True)
def _to64(x):
    return numba.float64(x)


@cuda.jit(device=True, inline=True)
def _same(x):
    return x  # the array store casts (float16/32/64 storage)


def loader(bf16, acc_dtype):
    """The device function that reads one stored element into the accumulation dtype."""
    if bf16:
        return load
    return _to64 if np.dtype(acc_dtype) == np.float64 else _to32


def storer(bf16):
    """The device function that turns an accumulator value into a stored element."""
    return store if bf16 else _same
