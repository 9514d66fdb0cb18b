"""The layers' rotary table: cos/sin rows grown on demand, Hugging Face's per-call rule
for the length-dependent rope types (``longrope``, ``dynamic``), a device copy for CUDA
caches. The kernels are :func:`numba_attn.apply_rotary` (numba_attn/rope.py).
"""
from __future__ import annotations

import numpy as np

__all__ = ["RotaryTable"]


class RotaryTable:
    """cos/sin tables grown geometrically on demand (no per-call work once large enough).

    Length-dependent rope types follow Hugging Face's per-call rule, with ``n`` the
    call's largest position + 1: ``longrope`` serves ``n`` with the long factors when
    ``n > original_max_position_embeddings``, else the short ones; ``dynamic`` rebuilds
    for ``n`` whenever ``n`` exceeds the longest length served so far, and returns to the
    original frequencies when ``n`` falls below ``max_position_embeddings``
    (``dynamic_rope_update``). Positions past :attr:`ROWS_MAX` are rotated with angles
    computed at those positions only (no table of that many rows).
    """

    ROWS_MAX = 1 << 20

    def __init__(self, rotary_dim, base, scaling, dtype):
        from ..rope import scaling_kind

        self.rotary_dim, self.base, self.scaling, self.dtype = rotary_dim, base, scaling, dtype
        self.cos = self.sin = None
        self.kind = scaling_kind(scaling)
        self._served = None
        if self.kind == "dynamic":
            self._dyn_max = int(scaling.get("max_position_embeddings")
                                or scaling["original_max_position_embeddings"])
            self._dyn_len = self._dyn_max

    def _seq_len(self, n):
        """(seq_len to build tables for, key of the tables' content) for largest pos n - 1."""
        if self.kind == "longrope":
            return n, n > float(self.scaling["original_max_position_embeddings"])
        if self.kind == "dynamic":
            prev = self._dyn_len
            if n > prev:  # growth
                self._dyn_len = n
            if n < self._dyn_max and prev > self._dyn_max:  # reset
                self._dyn_len = self._dyn_max
            return self._dyn_len, self._dyn_len
        return None, None

    def freq_att(self, seq_len):
        """(inv_freq float64, attention factor) for tables serving ``seq_len``."""
        from ..reference_rope import rope_parameters

        return rope_parameters(self.rotary_dim, self.base, self.scaling, seq_len)

    def _tables(self, positions, seq_len):
        freq, att = self.freq_att(seq_len)
        ang = np.outer(np.asarray(positions, dtype=np.float64), freq)
        return (np.ascontiguousarray(np.cos(ang) * att, dtype=self.dtype),
                np.ascontiguousarray(np.sin(ang) * att, dtype=self.dtype))

    def get(self, n):
        """(cos, sin), each (>= n, rotary_dim // 2)."""
        seq_len, key = self._seq_len(int(n))
        if self.cos is None or self.cos.shape[0] < n or key != self._served:
            old = 0 if self.cos is None else self.cos.shape[0]
            size = max(int(n), 256, 2 * old if old < n else old)
            self.cos, self.sin = self._tables(np.arange(size), seq_len)
            self._served = key
        return self.cos, self.sin

    def get_device(self):
        """The current tables as CUDA device arrays (copied once per growth)."""
        if getattr(self, "_dev_src", None) is not self.cos:
            from numba import cuda

            self._dev = (cuda.to_device(self.cos), cuda.to_device(self.sin))
            self._dev_src = self.cos
        return self._dev

    def rotate(self, x, positions, interleaved):
        """x (batch, seq, heads, dim) rotated at positions (batch, seq) int64."""
        from ..rope import apply_rotary

        n = int(positions.max(initial=0)) + 1
        if n <= self.ROWS_MAX:
            cos, sin = self.get(n)
            return apply_rotary(x, cos, sin, interleaved=interleaved, positions=positions)
        cos, sin = self._tables(positions.reshape(-1), self._seq_len(n)[0])
        idx = np.arange(positions.size, dtype=np.int64).reshape(positions.shape)
        return apply_rotary(x, cos, sin, interleaved=interleaved, positions=idx)
