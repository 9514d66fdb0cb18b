"""Device-array helpers that functional.py calls for CUDA inputs.

Everything stays on the device: packing reshapes without a copy when it can (and copies
or casts with a small kernel when it must), the lse layouts are transposed on the device,
and results come back as the same kind of array as the input (a numba device array stays
one; a CuPy array or torch tensor gets a zero-copy view of the result).
"""
from __future__ import annotations

import sys

import numpy as np
from numba import cuda

from .. import dispatch as dp
from ..config import AttentionError
from . import forward as fk
from .launch import STORAGE_DTYPES, elementwise_grid

__all__ = ["as_device", "like", "pack", "check_out", "run_into", "lse_bhs", "lse_transpose",
           "merge_states"]


def as_device(name, x):
    """A numba device array viewing ``x`` (numba, CuPy, torch CUDA, ...), or an error naming it."""
    if hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x)
    if dp.array_device(x) == "cuda" and hasattr(x, "__dlpack__"):
        raise TypeError(f"{name}: a DLPack-only device array ({type(x).__name__}); pass an "
                        "array with __cuda_array_interface__ (numba, CuPy, torch CUDA)")
    raise AttentionError(f"{name}: a host array where device arrays were given; pass all "
                         "arrays on the same device")


def like(ref, x):
    """``x`` (a numba device array) as the kind of array ``ref`` is, without a copy."""
    mod = type(ref).__module__.split(".")[0]
    if mod == "cupy" and "cupy" in sys.modules:
        return sys.modules["cupy"].asarray(x)
    if mod == "torch" and "torch" in sys.modules:
        return sys.modules["torch"].as_tensor(x, device="cuda")
    return x


def _contiguous(x, dtype, shape):
    """``x`` as a C-contiguous device array of ``dtype`` reshaped to ``shape``."""
    if np.dtype(x.dtype) == dtype and x.is_c_contiguous():
        return x.reshape(shape)
    if x.ndim not in fk.COPY_KERNELS:
        if not x.is_c_contiguous():
            raise AttentionError(f"a non-contiguous {x.ndim}-D device array; make it "
                                 "contiguous first")
        x = x.reshape(1, x.size)
    dst = cuda.device_array(tuple(x.shape), dtype)
    if dst.size:
        grid, threads = elementwise_grid(dst.size)
        fk.COPY_KERNELS[x.ndim][grid, threads](x, dst)
    return dst.reshape(shape)


def pack(q, k, v, cdt):
    """q (B, Sq, H, D) or (Tq, H, D), k/v likewise -> (T, heads, dim) device arrays.

    float16/32/64 keep their storage dtype (the kernels accumulate in ``cdt``); other
    dtypes (bfloat16) are refused with a TypeError naming the argument.
    """
    res = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        dt = np.dtype(x.dtype)
        if dt not in STORAGE_DTYPES:
            raise TypeError(f"{name}: {dt} device arrays are not supported by the cuda kernels "
                            "(float16, float32, float64); cast on the device first")
        a = as_device(name, x)
        shape = (int(np.prod(a.shape[:-2], dtype=np.int64)),) + tuple(a.shape[-2:])
        res.append(_contiguous(a, dt, shape))  # a view when already contiguous
    return tuple(res)


def check_out(out, shape, dtype):
    """Validate a device ``out=`` array (shape and dtype as on the host); returns it."""
    if tuple(out.shape) != tuple(shape):
        raise AttentionError(f"out: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if np.dtype(out.dtype) != np.dtype(dtype):
        raise TypeError(f"out: expected dtype {np.dtype(dtype)} (the dtype of q), got "
                        f"{np.dtype(out.dtype)}")
    as_device("out", out)
    return out


def run_into(p, backend, out, out_shape):
    """Run ``p`` and write the result into the device array ``out``; returns (out, lse).

    A C-contiguous ``out`` of the kernel's output dtype is written by the kernel itself;
    otherwise the result is copied (and cast) into it on the device.
    """
    if p.device != "cuda":
        raise AttentionError("out: a device array while q, k, v are host arrays; pass all "
                             "arrays on the same device")
    dev = as_device("out", out)
    tq, h, dv = p.q.shape[0], p.config.num_heads, p.config.head_dim_v
    if dev.is_c_contiguous() and backend != "reference":
        p.extra["out_buffer"] = dev.reshape(tq, h, dv)
    o, lse = dp.run(p, backend)
    if p.extra.get("out_buffer") is not None and o is p.extra["out_buffer"]:
        return out, lse
    if isinstance(o, np.ndarray):
        o = cuda.to_device(np.ascontiguousarray(o))
    src = o.reshape(tuple(out_shape))  # 3-D (varlen) or 4-D (batched), like out
    if src.size:
        grid, threads = elementwise_grid(src.size)
        fk.COPY_KERNELS[src.ndim][grid, threads](src, dev)
    return out, lse


def _swap(lse, nb, ns, nh):
    src = as_device("lse", lse).reshape(nb, ns, nh)
    dst = cuda.device_array((nb, nh, ns), src.dtype)
    if dst.size:
        grid, threads = elementwise_grid(dst.size)
        fk.swap_last[grid, threads](src, dst)
    return dst


def lse_bhs(lse, bsz, sq, h):
    """lse (B * Sq, H) -> (B, H, Sq) on the device."""
    return _swap(lse, bsz, sq, h)


def lse_transpose(lse):
    """lse (Tq, H) -> (H, Tq) on the device."""
    t, h = lse.shape
    return _swap(lse, 1, t, h).reshape(h, t)


def merge_states(out_a, lse_a, out_b, lse_b):
    """Device twin of :func:`numba_attn.merge_states` (shapes already checked there)."""
    arrs = {}
    for name, x in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if dp.array_device(x) != "cuda":
            raise AttentionError(f"{name}: a host array while out_a is on the device; pass "
                                 "all four arrays on the same device")
        arrs[name] = as_device(name, x)
    dt = np.dtype(arrs["out_a"].dtype)
    if dt not in STORAGE_DTYPES:
        raise TypeError(f"out_a: dtype {dt} is not supported on the device (float16, float32, "
                        "float64)")
    for name in ("out_b",):
        if np.dtype(arrs[name].dtype) != dt:
            raise TypeError(f"{name}: dtype {arrs[name].dtype} differs from out_a's {dt}")
    cdt = dp.compute_dtype(dt)
    shape_o = tuple(out_a.shape)
    shape_l = tuple(lse_a.shape)
    s, h, dv = shape_o[-3:]
    lead = int(np.prod(shape_o[:-3], dtype=np.int64))
    oa = _contiguous(arrs["out_a"], dt, (lead, s, h, dv))
    ob = _contiguous(arrs["out_b"], dt, (lead, s, h, dv))
    la = _contiguous(arrs["lse_a"], cdt, (lead, h, s))
    lb = _contiguous(arrs["lse_b"], cdt, (lead, h, s))
    o = cuda.device_array((lead, s, h, dv), dt)
    lse = cuda.device_array((lead, h, s), cdt)
    if o.size:
        grid, threads = elementwise_grid(o.size)
        fk.merge_states[grid, threads](oa, la, ob, lb, o, lse)
    return like(out_a, o.reshape(shape_o)), like(out_a, lse.reshape(shape_l))
