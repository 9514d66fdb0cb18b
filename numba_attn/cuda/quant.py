"""8-bit KV caches on the device: int8 / float8 values with a float32 scale per
(position, kv head), the CUDA twin of what :mod:`numba_attn.quant` stores on the host.

The kernels read int8 values as int8 and float8 values as their uint8 bits (numba has no
float8 type), and dequantize in registers: ``value * scale``. The bit conversions build a
float32 from the fp8 fields (the way ``cpu/simd.py`` does on the host):

* float8_e4m3fn ``s eeee mmm``: a normal ``|x|`` has float32 bits ``(bits & 0x7F) << 20``
  plus the exponent rebias ``(127 - 7) << 23``; a subnormal (``e = 0``) is ``m * 2**-9``.
* float8_e5m2 ``s eeeee mm`` (the top byte of a float16): ``(bits & 0x7F) << 21`` plus
  ``(127 - 15) << 23``; a subnormal is ``m * 2**-16``.

Append quantizes on the device, one thread per (token, kv head), bit for bit what
:func:`numba_attn.quant.quantize` gives on the host: ``scale = max|x| / qmax`` (float32),
``y = clip(x / scale, -qmax, qmax)`` (scale 0 -> divide by 1), then round to nearest even
(int8: to an integer; float8: to 3 or 2 mantissa bits, subnormals to multiples of the
smallest one). NaN / inf never reach these functions: caches take finite values only.

Under the CUDA simulator libdevice is a stub; the tests' ``sim_shim`` supplies
``int_as_float`` / ``float_as_int`` (as for bfloat16).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda
from numba.cuda import libdevice

__all__ = ["code_of", "raw", "dequantizer", "encoder", "QMAX"]

INT8, E4M3, E5M2 = 1, 2, 3  # kernel specialisation codes (0: a float cache)
QMAX = {INT8: 127.0, E4M3: 448.0, E5M2: 57344.0}


def code_of(dtype):
    """The specialisation code of an 8-bit storage dtype, 0 for anything else."""
    name = str(np.dtype(dtype)) if not hasattr(dtype, "name") else dtype.name
    return {"int8": INT8, "float8_e4m3fn": E4M3, "float8_e5m2": E5M2}.get(name, 0)


def raw(x):
    """What a kernel reads of 8-bit storage: int8 as it is, float8 as its uint8 bits (host
    numpy arrays and numba device arrays alike, same memory)."""
    if code_of(x.dtype) in (E4M3, E5M2):
        return x.view(np.uint8)
    return x


@cuda.jit(device=True, inline=True)
def from_int8(u):
    return numba.float32(u)


@cuda.jit(device=True, inline=True)
def from_fp8(u, mbits, sub_scale, exp_shift):
    """fp8 bits (uint8) with ``mbits`` mantissa bits -> float32, exactly: a subnormal is
    ``m * sub_scale``, a normal number's exponent and mantissa move up into float32's
    (``mag << (23 - mbits)``) and its exponent is rebiased by ``exp_shift``."""
    b = numba.int32(u)
    mag = b & 0x7F
    if mag < (1 << mbits):
        x = numba.float32(mag) * numba.float32(sub_scale)
    else:
        x = libdevice.int_as_float(numba.int32((mag << (23 - mbits)) + (exp_shift << 23)))
    if b & 0x80:
        x = -x
    return x


@cuda.jit(device=True, inline=True)
def from_e4m3(u):
    """float8_e4m3fn bits (uint8) -> float32, exactly (0x7F / 0xFF, NaN, never stored):
    subnormals m * 2**-9, bias 7 -> 127."""
    return from_fp8(u, 3, 0.001953125, 120)


@cuda.jit(device=True, inline=True)
def from_e5m2(u):
    """float8_e5m2 bits (uint8) -> float32, exactly (inf / NaN never stored): subnormals
    m * 2**-16, bias 15 -> 127."""
    return from_fp8(u, 2, 1.52587890625e-05, 112)


@cuda.jit(device=True, inline=True)
def rint_even(y):
    """Nearest integer to a float, ties to even (np.rint)."""
    f = numba.int32(math.floor(numba.float32(y)))  # |y| <= 127 here: exact in float32
    r = numba.float32(y) - numba.float32(f)
    if r > numba.float32(0.5) or (r == numba.float32(0.5) and (f & 1) != 0):
        f += 1
    return f


@cuda.jit(device=True, inline=True)
def to_int8(y):
    """A value already clipped to [-127, 127] -> its int8 (round half to even)."""
    return rint_even(y)


@cuda.jit(device=True, inline=True)
def to_fp8(y, mbits, min_normal, sub_inv, exp_shift):
    """float32 within the format's range -> fp8 bits with ``mbits`` mantissa bits, round to
    nearest even: below ``min_normal`` a multiple of 1 / ``sub_inv``; else float32's
    exponent and top mantissa bits, rounded, rebiased by ``exp_shift``."""
    sign = (numba.uint32(libdevice.float_as_int(numba.float32(y))) >> 24) & 0x80
    a = abs(numba.float32(y))
    sh = 23 - mbits
    if a < numba.float32(min_normal):
        mag = numba.uint32(rint_even(a * numba.float32(sub_inv)))
    else:
        fb = numba.uint32(libdevice.float_as_int(a))
        fb = fb + numba.uint32((1 << (sh - 1)) - 1) + ((fb >> sh) & numba.uint32(1))
        mag = (fb >> sh) - numba.uint32(exp_shift << mbits)
    return numba.uint8(sign | mag)


@cuda.jit(device=True, inline=True)
def to_e4m3(y):
    """float32 in [-448, 448] -> float8_e4m3fn bits (normals from 2**-6, subnormals in
    steps of 2**-9)."""
    return to_fp8(y, 3, 0.015625, 512.0, 120)


@cuda.jit(device=True, inline=True)
def to_e5m2(y):
    """float32 in [-57344, 57344] -> float8_e5m2 bits (normals from 2**-14, subnormals in
    steps of 2**-16)."""
    return to_fp8(y, 2, 6.103515625e-05, 65536.0, 112)


def dequantizer(code):
    """The device function: stored element (int8, or float8 bits) -> float32."""
    return {INT8: from_int8, E4M3: from_e4m3, E5M2: from_e5m2}[code]


def encoder(code):
    """The device function: float32 already clipped to [-qmax, qmax] -> stored element."""
    return {INT8: to_int8, E4M3: to_e4m3, E5M2: to_e5m2}[code]
