"""Reading float16 storage in CPU kernels (Numba has no float16 arithmetic on the CPU).

float16 caches are handed to the kernels as ``uint16`` views; :func:`ld` reads an element
as float32 (bit manipulation, branch-free, vectorisable, no F16C or libgcc helper
needed) and is the identity for float arrays, so one kernel source serves both.
"""
from __future__ import annotations

import numpy as np
from numba.core import types
from numba.extending import overload, register_jitable

from .expmath import _i32_as_f32


@register_jitable
def half_bits_to_f32(h):
    """IEEE binary16 bits (an integer) -> float32, subnormals, infinities and NaN included."""
    h = np.int32(h) & np.int32(0xFFFF)
    sign = (h & np.int32(0x8000)) << np.int32(16)
    ex = (h >> np.int32(10)) & np.int32(0x1F)
    mant = h & np.int32(0x3FF)
    normal = _i32_as_f32(sign | ((ex + np.int32(112)) << np.int32(23)) | (mant << np.int32(13)))
    special = _i32_as_f32(sign | np.int32(0x7F800000) | (mant << np.int32(13)))
    sub = np.float32(mant) * np.float32(5.960464477539063e-08)  # mant * 2**-24
    sub = -sub if sign != 0 else sub
    return normal if (ex != 0 and ex != 31) else (special if ex == 31 else sub)


def ld(x, i):
    """``x[i]`` as a float: float16 bits in a uint16 array are converted to float32."""
    raise NotImplementedError  # jitted code only (overload below)


@overload(ld, inline="always")
def _ld_impl(x, i):
    if isinstance(x, types.Array) and x.dtype == types.uint16:
        return lambda x, i: half_bits_to_f32(x[i])
    return lambda x, i: x[i]


def as_kernel_storage(x):
    """What the CPU kernels take for K/V storage: float16 as its uint16 bits, else ``x``."""
    return x.view(np.uint16) if x.dtype == np.float16 else x
