"""Launch helpers for the CUDA kernels: tile plan, split-KV choice, cached launch configs.

A plan (kernel specialisation + tile sizes) is cached per shape class, so a repeated call
of one pattern (e.g. decode: one query, a growing cache) only builds its small ``items``
table, copies it with ``rows`` to the device and launches.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from numba import cuda

from ..config import AttentionError
from ..cpu.launch import make_items as _make_items
from ..dispatch import CONTIGUOUS_BLOCK
from ..masking import CAUSAL_CODES
from . import forward as fk

SHARED_BYTES = 46 * 1024  # static shared memory per block stays under the 48 KiB limit
MAX_SPLITS = 64  # gridDim.z limit
STORAGE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

_local = threading.local()


@contextmanager
def tuning(**kw):
    """Force plan fields (block_q, block_k, num_warps, nsplit) in this thread (tests)."""
    old = getattr(_local, "tuning", {})
    _local.tuning = {**old, **kw}
    try:
        yield
    finally:
        _local.tuning = old


@dataclass(frozen=True)
class Plan:
    block_q: int
    block_k: int
    num_warps: int
    rows_target: int


def _next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def shared_bytes(acc_itemsize, d, dv, group, block_q, block_k, num_warps):
    rows = group * block_q
    qrows = -(-rows // num_warps) * num_warps
    pcols = -(-block_k // 32) * 32
    return (qrows * (d + pcols) + block_k * (d + 1) + block_k * dv) * acc_itemsize \
        + block_k * 8


_PLANS = {}


def plan(acc_dtype, d, dv, group, max_q):
    """Tile sizes for one shape class (cached); None when even the smallest tile does not fit."""
    force = getattr(_local, "tuning", {})
    key = (np.dtype(acc_dtype).str, d, dv, group, _next_pow2(max_q), tuple(sorted(force.items())))
    got = _PLANS.get(key, False)
    if got is not False:
        return got
    item = np.dtype(acc_dtype).itemsize
    block_q = force.get("block_q") or max(1, min(_next_pow2(max_q), 16 // group))
    rows = group * block_q
    num_warps = force.get("num_warps") or max(1, min(4, rows))
    result = None
    cands = [force["block_k"]] if force.get("block_k") else [64, 32, 16, 8, 4, 2, 1]
    for bk in cands:
        if shared_bytes(item, d, dv, group, block_q, bk, num_warps) <= SHARED_BYTES:
            result = Plan(block_q, bk, num_warps, rows)
            break
    _PLANS[key] = result
    return result


_SM_COUNT = []


def sm_count():
    if not _SM_COUNT:
        try:
            from numba import config

            n = 2 if config.ENABLE_CUDASIM else cuda.get_current_device().MULTIPROCESSOR_COUNT
        except Exception:  # pragma: no cover - attribute missing on odd drivers
            n = 80
        _SM_COUNT.append(int(n))
    return _SM_COUNT[0]


def choose_splits(n_blocks, max_k, block_k):
    """Split the keys when there are fewer blocks than ~2 per SM and keys are many."""
    force = getattr(_local, "tuning", {}).get("nsplit")
    if force:
        return int(force)
    want = 2 * sm_count()
    if n_blocks == 0 or n_blocks >= want or max_k < 4 * block_k:
        return 1
    return int(max(1, min(-(-want // n_blocks), max_k // (2 * block_k), MAX_SPLITS)))


def make_items(rows, block_q):
    """(n, 3) int64 work items (batch row, first query, end query), as on the CPU.

    Fast path for decode-sized calls where every row fits one query tile.
    """
    lens = rows[:, 1]
    if len(rows) and lens.max() <= block_q:
        nz = np.flatnonzero(lens)
        items = np.empty((len(nz), 3), np.int64)
        items[:, 0] = nz
        items[:, 1] = rows[nz, 0]
        items[:, 2] = items[:, 1] + lens[nz]
        return items
    return _make_items(rows, block_q)


_DUMMIES = {}


def dummy(dtype, ndim=1):
    """A cached one-element device array standing in for an absent optional input."""
    key = (np.dtype(dtype).str, ndim)
    if key not in _DUMMIES:
        _DUMMIES[key] = cuda.to_device(np.zeros((1,) * ndim, dtype=dtype))
    return _DUMMIES[key]


def to_device(x):
    """Host arrays are copied over; device arrays pass through."""
    if x is None or hasattr(x, "copy_to_host"):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cuda.as_cuda_array(x)
    return cuda.to_device(np.ascontiguousarray(x))


def _block_table(p):
    """The device block table; contiguous stores share a cached all-zero one per batch."""
    bt = p.block_table
    if hasattr(bt, "copy_to_host") or hasattr(bt, "__cuda_array_interface__"):
        return to_device(bt)
    if p.block_size >= CONTIGUOUS_BLOCK and bt.shape[1] == 1 and not bt.any():
        key = ("zeros", np.dtype(bt.dtype).str, bt.shape[0])
        if key not in _DUMMIES:
            _DUMMIES[key] = cuda.to_device(np.zeros(bt.shape, bt.dtype))
        return _DUMMIES[key]
    return cuda.to_device(np.ascontiguousarray(bt))


def elementwise_grid(n, threads=256):
    return max(1, -(-int(n) // threads)), threads


def forward(p):
    """Run the CUDA forward on a dispatch.Problem; returns out (Tq, H, Dv), lse (Tq, H).

    Device problems give device arrays (out in ``p.out_dtype``); host problems (an explicit
    ``backend="cuda"`` with numpy inputs) are copied over and the results back.
    """
    cfg = p.config
    acc = np.dtype(p.compute_dtype)
    on_host = p.device != "cuda"
    tq, h, dv = p.q.shape[0], cfg.num_heads, cfg.head_dim_v
    out_dt = np.dtype(p.out_dtype) if not on_host and p.out_dtype in STORAGE_DTYPES else acc
    buf = p.extra.get("out_buffer")
    if not on_host and buf is not None and not hasattr(buf, "copy_to_host"):
        raise AttentionError("out: a host array while q, k, v are device arrays; pass all "
                             "arrays on the same device")
    if not on_host and buf is not None and np.dtype(buf.dtype) == out_dt:
        out = buf  # the caller's contiguous device out=, written in place
    else:
        out = cuda.device_array((tq, h, dv), out_dt)
    lse = cuda.device_array((tq, h), acc)
    if tq:
        _launch(p, acc, out, lse)
    if not on_host:
        return out, lse
    if buf is not None and buf.dtype == out_dt:
        out.copy_to_host(buf)
        return buf, lse.copy_to_host()
    return out.copy_to_host(), lse.copy_to_host()


def _mod_args(mods, acc):
    """(sargs, margs, bflags, bq, bk) for the kernel: host arrays of the mods' argument
    tuples copied to the device; dummies without mods / block mask."""
    if mods is None:
        return (), (), dummy(np.int8, 4), np.int64(1), np.int64(1)
    dev = lambda t: tuple(cuda.to_device(a) if isinstance(a, np.ndarray) else a  # noqa: E731
                          for a in t)
    flags = dummy(np.int8, 4) if mods.bflags is None else cuda.to_device(mods.bflags)
    return (dev(mods.sargs), dev(mods.margs), flags, np.int64(mods.bq), np.int64(mods.bk))


def _launch(p, acc, out, lse):
    cfg = p.config
    pl = plan(acc, cfg.head_dim, cfg.head_dim_v, cfg.group_size, p.max_seqlen_q)
    mods = p.extra.get("mods")
    smod = mmod = None
    if mods is not None:
        smod = None if mods.smod is None else mods.raw[0]
        mmod = None if mods.mmod is None else mods.raw[2]
    blocks = mods is not None and mods.bflags is not None
    kernel = fk.make_forward(acc, cfg.head_dim, cfg.head_dim_v, cfg.group_size, pl.block_q,
                             pl.block_k, pl.num_warps, smod, mmod, blocks,
                             0 if mods is None else len(mods.sargs),
                             0 if mods is None else len(mods.margs))
    items = make_items(p.rows, pl.block_q)
    if len(items) == 0:
        return
    nsplit = choose_splits(len(items) * cfg.num_kv_heads, p.max_seqlen_k, pl.block_k)
    tq, h, dv = out.shape
    if nsplit > 1:
        part_out = cuda.device_array((nsplit, tq, h, dv), acc)
        part_lse = cuda.device_array((nsplit, tq, h), acc)
    else:
        part_out, part_lse = dummy(acc, 4), dummy(acc, 3)
    opt = lambda x, dt, nd=1: dummy(dt, nd) if x is None else to_device(x)  # noqa: E731
    kernel[(len(items), cfg.num_kv_heads, nsplit), 32 * pl.num_warps](
        to_device(p.q), to_device(p.k), to_device(p.v), out, lse, part_out, part_lse,
        cuda.to_device(np.concatenate((p.rows.reshape(-1), items.reshape(-1)))),
        np.int64(p.rows.size), _block_table(p),
        np.int64(p.block_size), acc.type(cfg.scale), np.int64(CAUSAL_CODES[cfg.causal]),
        np.int64(cfg.window[0]), np.int64(cfg.window[1]), acc.type(cfg.softcap),
        opt(p.slopes, acc, 2), p.slopes is not None,
        opt(p.bias, acc), opt(p.bias_strides, np.int64), p.bias is not None,
        opt(p.mask, np.bool_), opt(p.mask_strides, np.int64), p.mask is not None,
        opt(p.sinks, acc), p.sinks is not None, *_mod_args(mods, acc))
    if nsplit > 1:
        grid, threads = elementwise_grid(tq * h * dv)
        fk.merge_splits[grid, threads](part_out, part_lse, out, lse)
