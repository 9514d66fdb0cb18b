"""Vectorisable ``exp`` for the softmax (no SVML here: ``math.exp`` in a loop is scalar).

``exp(x) = 2**n * exp(r)`` with ``n = round(x / ln 2)``, ``|r| <= ln2 / 2``, a Taylor
polynomial for ``exp(r)`` (degree 7 in float32, 13 in float64: truncation error below the
working precision) and ``2**n`` built from exponent bits with an
LLVM bitcast. Arguments are <= 0 in use (scores minus the running max); below the clamp
the result is exactly 0, so masked ``-inf`` scores contribute nothing.

The loops are element-wise over a row (no horizontal reduction), which LLVM vectorises.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

_FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}
_LOG2E = 1.4426950408889634


@intrinsic
def _i32_as_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as float32 (an LLVM bitcast; vectorises)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        bits = args[0]
        if x.bitwidth != 32:
            bits = builder.trunc(bits, ir.IntType(32))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(x), codegen


@intrinsic
def _i64_as_f64(typingctx, x):
    """Reinterpret int64 bits as float64 (an LLVM bitcast; vectorises)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


def exp_diff_acc(x, m, n, acc):
    """In place ``x[:n] = exp(x[:n] - m[:n])`` and ``acc[:n] += x[:n]``.

    Requires ``x - m <= 0`` and not NaN (``m`` finite, or ``x = -inf`` with finite ``m``).
    """
    raise NotImplementedError  # only callable from jitted code (overload below)


@overload(exp_diff_acc, jit_options=dict(fastmath=_FASTMATH))
def _exp_diff_acc_impl(x, m, n, acc):
    if x.dtype == types.float32:
        def impl32(x, m, n, acc):
            for j in range(n):
                y = np.float32(x[j] - m[j])
                if y < np.float32(-88.0):
                    y = np.float32(-88.0)  # k = -127 below: exactly 0
                # y <= 0: truncation of y/ln2 - 1/2 rounds y/ln2 to nearest (vectorises,
                # unlike math.floor, which calls libm)
                t = np.int32(y * np.float32(_LOG2E) - np.float32(0.5))
                tf = np.float32(t)
                r = y - tf * np.float32(0.693145751953125) - tf * np.float32(1.4286068203094173e-06)
                p = np.float32(1.0 / 5040.0)
                p = p * r + np.float32(1.0 / 720.0)
                p = p * r + np.float32(1.0 / 120.0)
                p = p * r + np.float32(1.0 / 24.0)
                p = p * r + np.float32(1.0 / 6.0)
                p = p * r + np.float32(0.5)
                p = p * r + np.float32(1.0)
                p = p * r + np.float32(1.0)
                e = p * _i32_as_f32((t + np.int32(127)) << np.int32(23))
                x[j] = e
                acc[j] += e
        return impl32

    def impl64(x, m, n, acc):
        for j in range(n):
            y = x[j] - m[j]
            if y < -709.0:
                y = -709.0  # k = -1023 below: exactly 0
            t = np.int64(y * _LOG2E - 0.5)
            tf = np.float64(t)
            r = y - tf * 0.6931471803691238 - tf * 1.9082149292705877e-10
            p = 1.0 / 6227020800.0
            p = p * r + 1.0 / 479001600.0
            p = p * r + 1.0 / 39916800.0
            p = p * r + 1.0 / 3628800.0
            p = p * r + 1.0 / 362880.0
            p = p * r + 1.0 / 40320.0
            p = p * r + 1.0 / 5040.0
            p = p * r + 1.0 / 720.0
            p = p * r + 1.0 / 120.0
            p = p * r + 1.0 / 24.0
            p = p * r + 1.0 / 6.0
            p = p * r + 0.5
            p = p * r + 1.0
            p = p * r + 1.0
            e = p * _i64_as_f64((t + np.int64(1023)) << np.int64(52))
            x[j] = e
            acc[j] += e
    return impl64
