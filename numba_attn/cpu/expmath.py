"""Vectorisable ``exp`` for the softmax (no SVML here: ``math.exp`` in a loop is scalar).

``exp(x) = 2**n * exp(r)`` with ``n = round(x / ln 2)``, ``|r| <= ln2 / 2``, a Taylor
polynomial for ``exp(r)`` (degree 7 in float32, 13 in float64: error below half an ulp
of the working precision before rounding) and ``2**n`` built from exponent bits through an
integer view of a scratch buffer. Arguments are <= 0 (scores minus the running max);
below the clamp the result is exactly 0, so masked ``-inf`` scores contribute nothing.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba.extending import overload

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln2 split so that n * _LN2_HI is exact
_LN2_LO = 1.4286068203094173e-06


def exp_sub_sum(row, m, n, ibuf):
    """In place ``row[:n] = exp(row[:n] - m)``; returns ``sum(row[:n])``.

    ``ibuf`` is an int64 scratch buffer at least ``n`` long (reinterpreted as int32
    for float32 rows).
    """
    raise NotImplementedError  # replaced by the overload below inside jitted code


@overload(exp_sub_sum, jit_options=dict(fastmath={"contract", "reassoc", "nsz", "arcp", "afn"}))
def _exp_sub_sum_impl(row, m, n, ibuf):
    if row.dtype == numba.types.float32:
        def impl32(row, m, n, ibuf):
            ib = ibuf.view(np.int32)
            fbits = ib[:n].view(np.float32)
            for j in range(n):
                x = np.float32(row[j] - m)
                if x < np.float32(-88.0):
                    x = np.float32(-88.0)
                t = math.floor(x * np.float32(_LOG2E) + np.float32(0.5))
                k = np.int32(t)
                tf = np.float32(t)
                r = x - tf * np.float32(_LN2_HI) - tf * np.float32(_LN2_LO)
                p = np.float32(1.0 / 5040.0)
                p = p * r + np.float32(1.0 / 720.0)
                p = p * r + np.float32(1.0 / 120.0)
                p = p * r + np.float32(1.0 / 24.0)
                p = p * r + np.float32(1.0 / 6.0)
                p = p * r + np.float32(0.5)
                p = p * r + np.float32(1.0)
                p = p * r + np.float32(1.0)
                row[j] = p
                ib[j] = (k + np.int32(127)) << np.int32(23)
            s = np.float32(0.0)
            for j in range(n):
                e = row[j] * fbits[j]
                row[j] = e
                s += e
            return s
        return impl32

    def impl64(row, m, n, ibuf):
        fbits = ibuf[:n].view(np.float64)
        for j in range(n):
            x = row[j] - m
            if x < -709.0:
                x = -709.0
            t = math.floor(x * _LOG2E + 0.5)
            k = np.int64(t)
            tf = np.float64(t)
            r = x - tf * 0.6931471803691238 - tf * 1.9082149292705877e-10
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
            row[j] = p
            ibuf[j] = (k + np.int64(1023)) << np.int64(52)
        s = 0.0
        for j in range(n):
            e = row[j] * fbits[j]
            row[j] = e
            s += e
        return s
    return impl64

