"""Prefill attention: numba_attn against numpy (matmul + softmax per head) and torch SDPA.

Shapes come from numba_attn.bench (the same table as ``python -m numba_attn bench``):

* ``gpt2_prefill_2k`` / ``gpt2_prefill_2k_causal``: B=1, H=16, S=2048, D=64
* ``llama3_8b_prefill_4k_gqa``: B=1, H=32, Hkv=8, S=4096, D=128, causal
* ``long_16k``: B=1, H=8, S=16384, D=64, causal (numpy skipped: S x S does not fit)
* ``gpt2_prefill_1k_float64``: B=1, H=16, S=1024, D=64, float64 (torch in float64 too)
* ``gpt2_backward_2k`` / ``gpt2_backward_2k_causal``: the backward of the gpt2 rows, against
  torch SDPA's autograd

``track_peak_over_io`` is (inputs + the peak memory a call adds) / (inputs + output): it
stays near 1 for a flash kernel and grows with S x S for the numpy peer.
"""
from __future__ import annotations

from numba_attn import bench as nb

from .common import Benchmark, nbytes, peak_rss_increase, require_torch

_SHAPES = {s.name: s for s in nb.SHAPES}
PREFILL = [s.name for s in nb.SHAPES if s.kind == "prefill"]
IMPLS = ["numba_attn", "numpy", "torch"]


class Prefill(Benchmark):
    """One forward call per sample, float32 BSHD inputs."""

    params = [PREFILL, IMPLS]
    param_names = ["shape", "impl"]

    def make(self, shape_name, impl):
        shape = _SHAPES[shape_name]
        q, k, v = nb.make_inputs(shape, seed=self.rng)
        self.in_bytes = nbytes(q, k, v)
        self.io_bytes = self.in_bytes + q.nbytes  # the output is shaped like q here
        self.scratch_bytes = 0
        if impl == "numba_attn":
            return nb.numba_attn_call(shape, q, k, v)
        if impl == "numpy":
            why = nb.numpy_peer_reason(shape)
            if why:
                raise NotImplementedError(why)
            # the peer preallocates its (Sq, Sk) scores and causal mask outside the call
            self.scratch_bytes = 2 * shape.seqlen_q * shape.seqlen_k * 4
            return nb.numpy_peer(shape, q, k, v)
        if impl == "torch":
            require_torch()
            return nb.torch_peer(shape, q, k, v)
        raise NotImplementedError(f"unknown impl {impl!r}")

    def time_attention(self, shape_name, impl):
        self.fn()

    def peakmem_attention(self, shape_name, impl):
        self.fn()

    def track_peak_over_io(self, shape_name, impl):
        extra = peak_rss_increase(self.fn) + self.scratch_bytes
        return (self.in_bytes + extra) / self.io_bytes

    track_peak_over_io.unit = "ratio"


BACKWARD = [s.name for s in nb.SHAPES if s.kind == "backward"]


class Backward(Benchmark):
    """One attention_backward per sample (out, lse and dout precomputed), against torch
    SDPA's autograd backward (its forward graph built once, untimed)."""

    params = [BACKWARD, ["numba_attn", "torch"]]
    param_names = ["shape", "impl"]

    def make(self, shape_name, impl):
        shape = _SHAPES[shape_name]
        q, k, v = nb.make_inputs(shape, seed=self.rng)
        if impl == "numba_attn":
            return nb.numba_attn_call(shape, q, k, v)
        if impl == "torch":
            require_torch()
            return nb.torch_peer(shape, q, k, v)
        raise NotImplementedError(f"unknown impl {impl!r}")

    def time_backward(self, shape_name, impl):
        self.fn()
