"""Rotary embeddings on the CPU (twin of :mod:`numba_attn.cuda.rope`).

``rotary`` rotates channel pairs of (tokens, heads, head_dim) arrays at per-token
positions; it may run in place (``out is x``).
"""
from __future__ import annotations

from numba import prange

from .._jit import jit

__all__ = ["rotary"]


@jit(parallel=True)
def rotary(x, cos, sin, pos, out, interleaved):
    """x, out (T, H, D); cos, sin (P, R/2); pos (T,) int64 in [0, P).

    Half-split pairs (c, c + R/2) or, with ``interleaved``, (2c, 2c + 1); channels from R
    on are copied. Each element is read before its pair is written, so ``out`` may be ``x``.
    """
    n_t, n_h, d = x.shape
    r2 = cos.shape[1]
    for t in prange(n_t):
        p = pos[t]
        for h in range(n_h):
            if interleaved:
                for c in range(r2):
                    a = x[t, h, 2 * c]
                    b = x[t, h, 2 * c + 1]
                    out[t, h, 2 * c] = a * cos[p, c] - b * sin[p, c]
                    out[t, h, 2 * c + 1] = b * cos[p, c] + a * sin[p, c]
            else:
                for c in range(r2):
                    a = x[t, h, c]
                    b = x[t, h, c + r2]
                    out[t, h, c] = a * cos[p, c] - b * sin[p, c]
                    out[t, h, c + r2] = b * cos[p, c] + a * sin[p, c]
            for c in range(2 * r2, d):
                out[t, h, c] = x[t, h, c]
