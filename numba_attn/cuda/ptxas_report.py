"""Static resource reading of the forward kernel by ``ptxas -v`` (no GPU needed).

The kernel's PTX comes from ``numba.cuda.compile_ptx`` (NVVM only, no driver); ``ptxas``
(CUDA toolkit, ``nvidia-cuda-nvcc``) assembles it for one architecture and reports
registers, spills, stack and static shared memory per block::

    python -m numba_attn.cuda.ptxas_report            # the plans of a few common shapes

A ptxas older than the PTX that NVVM writes refuses the ``.version`` line; the reading then
lowers it to the ptxas's own version (the kernel uses no newer PTX feature).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

__all__ = ["read_forward", "kernel_args", "main"]


def kernel_args(store, acc, sargs=(), margs=(), bflags_shape=(1, 1, 1, 1), kv_store=None):
    """Stand-in arguments of the forward kernel (zeros of the right types, for typing it
    without a GPU): ``store`` is the storage dtype of q, k, v, out (uint16 for bfloat16),
    ``acc`` the accumulator dtype; ``sargs`` / ``margs`` the mods' argument tuples and
    ``bflags_shape`` the block-mask flags' shape; ``kv_store`` the dtype of k and v when
    it differs (int8, or uint8 float8 bits, of an 8-bit cache)."""
    z = np.zeros
    kvs = store if kv_store is None else kv_store
    return (z((2, 2, 2), store), z((2, 2, 2), kvs), z((2, 2, 2), kvs), z((2, 2, 2), store),
            z((2, 2), acc), z((2, 2, 2, 2), acc), z((2, 2, 2), acc), z(16, np.int64),
            np.int64(10), z((2, 1), np.int32), np.int64(1), np.dtype(acc).type(1),
            np.int64(0), np.int64(0), np.int64(0), np.dtype(acc).type(0), z((1, 1), acc),
            True, z(1, acc), z(1, np.int64), True, z(1, np.bool_), z(1, np.int64), True,
            z(1, acc), True, tuple(sargs), tuple(margs), z(bflags_shape, np.int8),
            np.int64(1), np.int64(1), z((2, 2), np.float32), z((2, 2), np.float32))


def read_forward(dtype, d, dv, group, block_q, block_k, num_warps, *, dynamic=False,
                 heads=None, arch="sm_90", ptxas=None):
    """``ptxas -v`` reading of one forward kernel specialisation.

    Parameters
    ----------
    dtype : "float16", "bfloat16", "float32" or "float64"
        Storage dtype of q, k, v (float64 accumulates in float64, the others in float32).
    d, dv, group, block_q, block_k, num_warps, dynamic, heads
        As :func:`numba_attn.cuda.forward.make_forward` (a plan's fields).
    arch : str, default "sm_90"
    ptxas : str, optional
        The ptxas binary (default: the one on PATH).

    Returns
    -------
    dict with ``registers``, ``spill_stores``, ``spill_loads``, ``stack`` and
    ``static_shared`` (bytes per block), and ``ptxas`` (its report line).

    Raises
    ------
    FileNotFoundError
        No ptxas.

    Examples
    --------
    >>> from numba_attn.cuda.ptxas_report import read_forward
    >>> r = read_forward("float32", 64, 64, 1, 16, 64, 4)   # doctest: +SKIP
    >>> r["registers"], r["spill_stores"], r["static_shared"]  # doctest: +SKIP
    (108, 0, 41728)
    """
    import numba
    from numba import cuda

    from . import forward as fk

    exe = ptxas or shutil.which("ptxas")
    if not exe:
        raise FileNotFoundError("ptxas: not found on PATH (it comes with the CUDA toolkit or "
                                "the nvidia-cuda-nvcc wheel)")
    bf16 = dtype == "bfloat16"
    store = np.dtype(np.uint16) if bf16 else np.dtype(dtype)
    acc = np.dtype(np.float64) if store == np.float64 else np.dtype(np.float32)
    kern = fk.make_forward(acc, d, dv, group, block_q, block_k, num_warps, bf16=bf16,
                           dynamic=dynamic, heads=heads)
    sig = numba.types.void(*(numba.typeof(x) for x in kernel_args(store, acc)))
    cc = tuple(int(c) for c in arch.removeprefix("sm_"))
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(cc[0], int("".join(map(str, cc[1:])))))
    ver = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", ver)
    if m and int(m.group(1)) >= 12:  # CUDA 12.x/13.x ptxas reads PTX ISA (major - 4).minor
        own = (int(m.group(1)) - 4, int(m.group(2)))
        got = re.search(r"^\.version (\d+)\.(\d+)", ptx, flags=re.M)
        if got and (int(got.group(1)), int(got.group(2))) > own:
            ptx = re.sub(r"^\.version \d+\.\d+", f".version {own[0]}.{own[1]}", ptx,
                         flags=re.M)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([exe, "-v", f"-arch={arch}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    txt = res.stderr + res.stdout
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {txt.strip()[:500]}")

    def num(pattern):
        got = re.search(pattern, txt)
        return int(got.group(1)) if got else 0

    return dict(registers=num(r"Used (\d+) registers"),
                spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"),
                stack=num(r"(\d+) bytes stack frame"),
                static_shared=num(r"(\d+) bytes smem"),
                ptxas=" ".join(line.strip() for line in txt.splitlines()
                               if "Used" in line or "spill" in line))


# (label, dtype, d, dv, group, max_q): shapes whose plans are read by main()
SHAPES = [
    ("prefill D64", "float32", 64, 64, 1, 4096),
    ("prefill D128", "float32", 128, 128, 1, 4096),
    ("prefill D128 bf16", "bfloat16", 128, 128, 1, 4096),
    ("GQA 4 decode D128 f16", "float16", 128, 128, 4, 1),
    ("prefill D256", "float32", 256, 256, 1, 4096),
    ("prefill D64 f64", "float64", 64, 64, 1, 4096),
    ("MLA absorbed 16 heads", "float32", 576, 576, 16, 1),
    ("MLA absorbed 128 heads", "float32", 576, 576, 128, 1),
]


HOPPER_OPTIN = 227 * 1024  # sm_90's dynamic shared memory per block


def main():
    """Print the reading of the plan ``launch.plan`` picks for each of SHAPES (planned for
    sm_90's opt-in shared memory when no GPU is visible)."""
    from . import launch

    if launch.max_dynamic_shared() <= launch.STATIC_LIMIT:  # no device: plan for Hopper
        launch._DYN_LIMIT[:] = [HOPPER_OPTIN]

    print("| shape | plan (block_q, block_k, warps, heads/block) | shared | registers | "
          "spills (st/ld) | stack |")
    print("|---|---|---|---|---|---|")
    for label, dt, d, dv, group, max_q in SHAPES:
        acc = np.float64 if dt == "float64" else np.float32
        pl = launch.plan(np.dtype(acc), d, dv, group, max_q)
        r = read_forward(dt, d, dv, group, pl.block_q, pl.block_k, pl.num_warps,
                         dynamic=pl.dynamic > 0, heads=pl.heads or None)
        shared = f"{pl.dynamic} B dynamic" if pl.dynamic else f"{r['static_shared']} B static"
        print(f"| {label} | {pl.block_q}, {pl.block_k}, {pl.num_warps}, {pl.heads or group} "
              f"| {shared} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} B | "
              f"{r['stack']} B |")


if __name__ == "__main__":  # pragma: no cover
    main()
