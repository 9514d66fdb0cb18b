"""Atomic fetch-and-add for CPU kernels: a shared work counter for dynamic scheduling.

Numba has no CPU atomics; this intrinsic emits LLVM's ``atomicrmw add``. Kernels use it
to hand out cost-ordered work items one at a time, so that a thread slowed down by the
machine (another process, BLAS threads still spinning after the caller's numpy matmul)
does not hold up the whole call: the others take its share.
"""
from __future__ import annotations

from numba.core import cgutils, types
from numba.extending import intrinsic


@intrinsic
def fetch_add(typingctx, arr, idx, val):
    """Atomically ``old = arr[idx]; arr[idx] += val``; returns ``old`` (int64 arrays)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64
            and isinstance(idx, types.Integer) and isinstance(val, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        aryty, idxty, valty = sig.args
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        inc = context.cast(builder, args[2], valty, types.int64)
        return builder.atomic_rmw("add", ptr, inc, "monotonic")
    return types.int64(arr, idx, val), codegen
