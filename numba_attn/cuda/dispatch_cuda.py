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

from .. import dispatch
from .. import validate as dp
from ..config import AttentionError
from . import bf16 as bfm
from . import forward as fk
from .launch import elementwise_grid

__all__ = ["as_device", "like", "pack", "run_into", "lse_bhs", "lse_transpose",
           "merge_operands", "merge_result", "strided_operand", "to_device_like"]


def as_device(name, x):
    """A numba device array viewing ``x`` (numba, CuPy, torch CUDA, ...), or an error naming it.

    bfloat16 arrays keep their ``ml_dtypes.bfloat16`` dtype (a torch tensor is viewed
    through its bits: its interface says only ``<V2``)."""
    if hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        if type(x).__module__.split(".")[0] == "torch" and bfm.is_bf16(x.dtype):
            return bfm.from_bits(bfm.bits(x))
        return cuda.as_cuda_array(x)
    if dp.array_device(x) == "cuda" and hasattr(x, "__dlpack__"):
        raise TypeError(f"{name}: a DLPack-only device array ({type(x).__name__}); pass an "
                        "array with __cuda_array_interface__ (numba, CuPy, torch CUDA)")
    raise AttentionError(f"{name}: a host array where device arrays were given; pass all "
                         "arrays on the same device")


def like(ref, x):
    """``x`` (a numba device array) as the kind of array ``ref`` is, without a copy."""
    mod = type(ref).__module__.split(".")[0]
    bf16 = bfm.is_bf16(x.dtype)
    if mod == "cupy" and "cupy" in sys.modules and not bf16:  # CuPy has no bfloat16
        return sys.modules["cupy"].asarray(x)
    if mod == "torch" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if bf16:  # through the bits: torch reads "<u2", not the "<V2" of bfloat16
            return torch.as_tensor(bfm.bits(x), device="cuda").view(torch.bfloat16)
        return torch.as_tensor(x, device="cuda")
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

    float16/32/64 and bfloat16 keep their storage dtype (the kernels accumulate in
    ``cdt``; bfloat16 is copied, when it must be, through its uint16 bits).
    """
    res = []  # dtypes checked by validate.check_qkv (float16/32/64, bfloat16)
    for name, x in (("q", q), ("k", k), ("v", v)):
        dt = dp.as_np_dtype(x.dtype)
        a = as_device(name, x)
        shape = (int(np.prod(a.shape[:-2], dtype=np.int64)),) + tuple(a.shape[-2:])
        if bfm.is_bf16(dt):
            res.append(bfm.from_bits(_contiguous(bfm.bits(a), bfm.BITS, shape)))
        else:
            res.append(_contiguous(a, dt, shape))  # a view when already contiguous
    return tuple(res)


def strided_operand(name, x, shape4, dtype):
    """A device bias/mask (dtype and ``shape4``, its 4-D broadcast shape, checked by
    ``validate.strided_operand``) read in place: no copy to the host.

    Returns (flat C-contiguous device array of ``dtype``, int64 element strides with 0 on
    broadcast axes), as :func:`numba_attn.validate.strided_operand`. A C-contiguous array
    of ``dtype`` is used in place; another dtype or layout is cast / copied on the device.
    None (the host path decides) for what this cannot copy on the device: bfloat16 bias,
    1-D non-contiguous arrays.
    """
    dt = dp.as_np_dtype(x.dtype)
    if bfm.is_bf16(dt):
        return None
    a = as_device(name, x)
    if a.ndim == 0 or (a.ndim == 1 and not a.is_c_contiguous()):
        return None
    if np.dtype(a.dtype) != np.dtype(dtype) or not a.is_c_contiguous():
        if a.ndim == 1:
            a = a.reshape(1, a.size)
        a = _contiguous(a, np.dtype(dtype), tuple(a.shape))
    strides, step = [], 1
    for n in reversed(shape4):
        strides.append(0 if n == 1 else step)
        step *= n
    return a.reshape(a.size), np.array(strides[::-1], dtype=np.int64)


def run_into(p, backend, out, out_shape):
    """Run ``p`` and write the result into the device array ``out``; returns (out, lse).

    A C-contiguous ``out`` of the kernel's output dtype is written by the kernel itself;
    otherwise the result is copied (and cast) into it on the device.
    """
    dev = as_device("out", out)  # on the problem's device: validate.check_out
    tq, h, dv = p.q.shape[0], p.config.num_heads, p.config.head_dim_v
    if dev.is_c_contiguous() and backend != "reference":
        p.extra["out_buffer"] = dev.reshape(tq, h, dv)
    o, lse = dispatch.run(p, backend)
    if p.extra.get("out_buffer") is not None and o is p.extra["out_buffer"]:
        return out, lse
    if isinstance(o, np.ndarray):
        o = cuda.to_device(np.ascontiguousarray(o))
    src = o.reshape(tuple(out_shape))  # 3-D (varlen) or 4-D (batched), like out
    if bfm.is_bf16(src.dtype) and bfm.is_bf16(dev.dtype):
        src, dev = bfm.bits(src), bfm.bits(dev)  # a bit copy (the kernels see uint16)
    if src.size:
        grid, threads = elementwise_grid(src.size)
        fk.COPY_KERNELS[src.ndim][grid, threads](src, dev)
    return out, lse


def to_device_like(ref, arrays):
    """Host arrays copied to the GPU, each as the kind of array ``ref`` is."""
    return tuple(like(ref, cuda.to_device(np.ascontiguousarray(a))) for a in arrays)


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


def merge_operands(out_a, lse_a, out_b, lse_b, cdt):
    """Device twin of ``problem.merge_operands`` (checked by ``validate.check_merge``):
    out (lead, S, H, Dv) (bfloat16 as its bits), lse (lead, H, S) in ``cdt``."""
    arrs = {name: as_device(name, x) for name, x in
            (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b))}
    dt = dp.as_np_dtype(arrs["out_a"].dtype)
    sdt = bfm.BITS if bfm.is_bf16(dt) else dt  # bfloat16 outputs travel as their bits
    shape_o = tuple(out_a.shape)
    s, h, dv = shape_o[-3:]
    lead = int(np.prod(shape_o[:-3], dtype=np.int64))
    return (_contiguous(bfm.bits(arrs["out_a"]), sdt, (lead, s, h, dv)),
            _contiguous(arrs["lse_a"], cdt, (lead, h, s)),
            _contiguous(bfm.bits(arrs["out_b"]), sdt, (lead, s, h, dv)),
            _contiguous(arrs["lse_b"], cdt, (lead, h, s)))


def merge_result(ref, out, lse, dtype, out_shape, lse_shape):
    """Device twin of ``interop.merge_result``: out in ``dtype`` (bfloat16 from its bits)
    and ``out_shape``, lse in ``lse_shape``, as ``ref``'s kind of array."""
    out = bfm.from_bits(out) if bfm.is_bf16(dtype) else out
    return like(ref, out.reshape(out_shape)), like(ref, lse.reshape(lse_shape))


def kernel_input(name, x, cdt):
    """interop.kernel_input for device arrays: a C-contiguous numba device array viewing
    ``x`` (torch bfloat16 tensors through their bits)."""
    from .rope import canonical

    return canonical(x, cdt)

