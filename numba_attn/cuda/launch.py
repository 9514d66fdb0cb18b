"""Every launcher of the CUDA kernels: the forward (tile plan, split-KV choice, cached
launch configs), the dropout forward and the backward (kernels in backward.py) and
merge_states (twin of cpu/launch.py).

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

from .. import planning
from ..config import AttentionError, BackendUnavailable
from ..planning import make_items as _make_items
from ..problem import CONTIGUOUS_BLOCK
from ..masking import CAUSAL_CODES
from . import backward as bwk
from . import bf16 as bfm
from . import forward as fk
from . import quant as cq

SHARED_BYTES = 46 * 1024  # static shared memory per block stays under the 48 KiB limit
# Tiles that static shared memory caps below DYNAMIC_BELOW_BK keys (large head dims: MLA's
# absorbed D = 576 gets one key per tile) move to dynamic shared memory, up to
# DYNAMIC_BUDGET bytes per block (two such blocks per Hopper SM; to be tuned on a GPU).
DYNAMIC_BELOW_BK = 8
DYNAMIC_BUDGET = 100 * 1024
STATIC_LIMIT = 48 * 1024  # a launch above this needs the kernel's opt-in attribute
ROWS_PER_BLOCK = 16  # largest head chunk when a GQA group must be spread over blocks
MAX_SPLITS = 64  # gridDim.z limit
STORAGE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

_local = threading.local()


@contextmanager
def tuning(**kw):
    """Force plan fields (block_q, block_k, num_warps, nsplit, heads, dynamic) in this
    thread (tests, tuning on a GPU). ``heads``: query heads per block (a divisor of the
    group). ``dynamic=True`` puts the tiles in dynamic shared memory (budget
    ``dynamic_budget``, default the device's opt-in limit), ``False`` never does."""
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
    dynamic: int = 0  # bytes of dynamic shared memory per block (0: static tiles)
    heads: int = 0  # query heads per block (0: the whole group)


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
    """Tile sizes for one shape class (cached); None when even the smallest tile does not fit.

    The whole GQA group shares a block when its tiles fit; otherwise the group is spread
    over blocks of ``heads`` query heads (the largest divisor of the group, at most
    ROWS_PER_BLOCK, that fits).
    """
    force = getattr(_local, "tuning", {})
    key = (np.dtype(acc_dtype).str, d, dv, group, _next_pow2(max_q),
           tuple(sorted(force.items())), max_dynamic_shared())
    got = _PLANS.get(key, False)
    if got is not False:
        return got
    result = None
    # the whole group, else chunks of at most ROWS_PER_BLOCK heads (the 16 score rows a
    # 4-warp block holds elsewhere: ptxas reads 216 registers + 320 B stack for 16 MLA
    # heads at D = 576, 247 + 672 B for 32)
    divisors = [group] + [hb for hb in range(min(group - 1, ROWS_PER_BLOCK), 0, -1)
                          if group % hb == 0]
    for hb in ([force["heads"]] if force.get("heads") else divisors):
        result = _plan_heads(acc_dtype, d, dv, hb, max_q, force)
        if result is not None:
            if hb != group:
                result = Plan(result.block_q, result.block_k, result.num_warps,
                              result.rows_target, result.dynamic, hb)
            break
    _PLANS[key] = result
    return result


def _plan_heads(acc_dtype, d, dv, group, max_q, force):
    """The plan of a block holding ``group`` query heads, or None."""
    item = np.dtype(acc_dtype).itemsize
    block_q = force.get("block_q") or max(1, min(_next_pow2(max_q), 16 // group))
    rows = group * block_q
    num_warps = force.get("num_warps") or max(1, min(4, rows))
    result = None
    cands = [force["block_k"]] if force.get("block_k") else [64, 32, 16, 8, 4, 2, 1]
    dyn = force.get("dynamic")
    if dyn is not True:
        for bk in cands:
            if shared_bytes(item, d, dv, group, block_q, bk, num_warps) <= SHARED_BYTES:
                result = Plan(block_q, bk, num_warps, rows)
                break
    small = result is None or result.block_k < DYNAMIC_BELOW_BK
    budget = min(force.get("dynamic_budget") or DYNAMIC_BUDGET, max_dynamic_shared())
    if dyn is True or (dyn is None and small and budget > STATIC_LIMIT):
        if dyn is True:
            budget = force.get("dynamic_budget") or max_dynamic_shared()
        for bk in cands:
            nbytes = shared_bytes(item, d, dv, group, block_q, bk, num_warps)
            if nbytes <= budget and (result is None or bk > result.block_k or dyn is True):
                result = Plan(block_q, bk, num_warps, rows, nbytes)
                break
    return result


_DYN_LIMIT = []


def max_dynamic_shared():
    """Bytes of dynamic shared memory a block may opt in to (cached): the device's
    ``MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`` (227 KiB on Hopper), Hopper's figure under the
    simulator, the static limit (no dynamic tiles) when unknown or after a failed opt-in."""
    if not _DYN_LIMIT:
        try:
            from numba import config

            if config.ENABLE_CUDASIM:
                n = 227 * 1024
            else:
                n = int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        except Exception:  # pragma: no cover - attribute missing on odd drivers
            n = STATIC_LIMIT
        _DYN_LIMIT.append(n)
    return _DYN_LIMIT[0]


_OPTED_IN = {}
DYNAMIC_FAILURE = []  # why an opt-in failed (the plans then stay static)


def opt_in_shared(kernel, args, nbytes):
    """Let the compiled ``kernel`` overload for ``args`` use ``nbytes`` of dynamic shared
    memory (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES); needed above 48 KiB."""
    from numba import config

    if nbytes <= STATIC_LIMIT or config.ENABLE_CUDASIM:
        return
    overload = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    if _OPTED_IN.get(id(overload), 0) >= nbytes:
        return
    from numba.cuda.cudadrv.driver import binding, driver

    cufunc = overload._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)
    _OPTED_IN[id(overload)] = nbytes


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
    bf16 = not on_host and bfm.is_bf16(p.out_dtype)  # q, k, v, out: bfloat16 storage
    out_dt = np.dtype(p.out_dtype) if not on_host and (p.out_dtype in STORAGE_DTYPES
                                                       or bf16) else acc
    buf = p.extra.get("out_buffer")
    if not on_host and buf is not None and not hasattr(buf, "copy_to_host"):
        raise AttentionError("out: a host array while q, k, v are device arrays; pass all "
                             "arrays on the same device")
    if not on_host and buf is not None and np.dtype(buf.dtype) == out_dt:
        out = buf  # the caller's contiguous device out=, written in place
    else:
        out = cuda.device_array((tq, h, dv), bfm.BITS if bf16 else out_dt)
        if bf16:
            out = bfm.from_bits(out)
    lse = cuda.device_array((tq, h), acc)
    if tq:
        _launch(p, acc, bfm.bits(out) if bf16 else out, lse, bf16)
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


def _launch(p, acc, out, lse, bf16=False):
    cfg = p.config
    pl = plan(acc, cfg.head_dim, cfg.head_dim_v, cfg.group_size, p.max_seqlen_q)
    if pl is None:  # only after a failed opt-in: the checks planned with dynamic memory
        raise BackendUnavailable(
            f"backend 'cuda' cannot serve this call: head_dim={cfg.head_dim} does not fit "
            f"in static shared memory and the dynamic shared memory opt-in failed "
            f"({DYNAMIC_FAILURE[-1] if DYNAMIC_FAILURE else 'unknown'})")
    mods = p.extra.get("mods")
    scales = p.extra.get("kv_scales")  # an 8-bit KV cache: dequantized in the kernel
    qcode = cq.code_of(p.k.dtype) if scales is not None else 0
    smod = mmod = None
    if mods is not None:
        smod = None if mods.smod is None else mods.raw[0]
        mmod = None if mods.mmod is None else mods.raw[2]
    kernel = fk.make_forward(
        acc, cfg.head_dim, cfg.head_dim_v, cfg.group_size, pl.block_q, pl.block_k,
        pl.num_warps, bf16=bf16, dynamic=pl.dynamic > 0, heads=pl.heads or None,
        smod=smod, mmod=mmod, blocks=mods is not None and mods.bflags is not None,
        n_sargs=0 if mods is None else len(mods.sargs),
        n_margs=0 if mods is None else len(mods.margs), quant=qcode)
    head_blocks = cfg.num_kv_heads * (cfg.group_size // (pl.heads or cfg.group_size))
    store = bfm.bits if bf16 else to_device  # bfloat16 storage travels as uint16 bits
    items = make_items(p.rows, pl.block_q)
    if len(items) == 0:
        return
    nsplit = choose_splits(len(items) * head_blocks, p.max_seqlen_k, pl.block_k)
    tq, h, dv = out.shape
    if nsplit > 1:
        part_out = cuda.device_array((nsplit, tq, h, dv), acc)
        part_lse = cuda.device_array((nsplit, tq, h), acc)
    else:
        part_out, part_lse = dummy(acc, 4), dummy(acc, 3)
    opt = lambda x, dt, nd=1: dummy(dt, nd) if x is None else to_device(x)  # noqa: E731
    if qcode:
        kk, vv = to_device(cq.raw(p.k)), to_device(cq.raw(p.v))
        ksc, vsc = to_device(scales[0]), to_device(scales[1])
    else:
        kk, vv = store(p.k), store(p.v)
        ksc = vsc = dummy(np.float32, 2)
    args = (
        store(p.q), kk, vv, out, lse, part_out, part_lse,
        cuda.to_device(np.concatenate((p.rows.reshape(-1), items.reshape(-1)))),
        np.int64(p.rows.size), _block_table(p),
        np.int64(p.block_size), acc.type(cfg.scale), np.int64(CAUSAL_CODES[cfg.causal]),
        np.int64(cfg.window[0]), np.int64(cfg.window[1]), acc.type(cfg.softcap),
        opt(p.slopes, acc, 2), p.slopes is not None,
        opt(p.bias, acc), opt(p.bias_strides, np.int64), p.bias is not None,
        opt(p.mask, np.bool_), opt(p.mask_strides, np.int64), p.mask is not None,
        opt(p.sinks, acc), p.sinks is not None, *_mod_args(mods, acc), ksc, vsc)
    if pl.dynamic:
        try:
            opt_in_shared(kernel, args, pl.dynamic)
        except Exception as e:  # pragma: no cover - driver-specific
            if getattr(_local, "tuning", {}).get("dynamic"):
                raise
            DYNAMIC_FAILURE.append(f"{type(e).__name__}: {e}")
            _DYN_LIMIT[:] = [STATIC_LIMIT]  # static tiles from now on
            _PLANS.clear()
            return _launch(p, acc, out, lse, bf16)
    kernel[(len(items), head_blocks, nsplit), 32 * pl.num_warps, 0, pl.dynamic](*args)
    if nsplit > 1:
        grid, threads = elementwise_grid(tq * h * dv)
        merge = fk.merge_splits_bf16 if bf16 else fk.merge_splits
        merge[grid, threads](part_out, part_lse, out, lse)


def merge_states(out_a, lse_a, out_b, lse_b):
    """``merge_states`` over device arrays out (lead, S, H, Dv) (bfloat16 as its bits),
    lse (lead, H, S) in the compute dtype: (out, lse), new device arrays."""
    o = cuda.device_array(out_a.shape, out_a.dtype)
    lse = cuda.device_array(lse_a.shape, lse_a.dtype)
    if o.size:
        grid, threads = elementwise_grid(o.size)
        bf16 = np.dtype(out_a.dtype) == np.dtype(bfm.BITS)
        kern = fk.merge_states_bf16 if bf16 else fk.merge_states
        kern[grid, threads](out_a, lse_a, out_b, lse_b, o, lse)
    return o, lse


# ---------------------------------------------------------------------------------------
# the dropout forward and the backward (kernels in backward.py)
# ---------------------------------------------------------------------------------------
def _bgrid(n, threads=64):
    """Grid of the backward's per-thread kernels."""
    return max(1, -(-int(n) // threads)), threads


def _dev(x):
    return to_device(x)


def _bwd_common(p):
    args = list(planning.options(p))
    for n in (5, 7, 8, 10, 11):  # slopes, bias, bias strides, mask, mask strides
        args[n] = _dev(args[n])
    return tuple(args)


def _drop(p, drop_p, seed):
    return planning.dropout_args(p, drop_p, seed)


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


def forward_dropout(p, drop_p, seed):
    """Forward with dropout of a contiguous Problem; device arrays for a device problem,
    host arrays (copied back) otherwise."""
    cfg = p.config
    dt = np.dtype(p.compute_dtype)
    tq = p.q.shape[0]
    out = cuda.device_array((tq, cfg.num_heads, cfg.head_dim_v), dt)
    lse = cuda.device_array((tq, cfg.num_heads), dt)
    if tq:
        q, k, v = (_dev(_host(x).astype(dt)) if p.device != "cuda" or np.dtype(x.dtype) != dt
                   else _dev(x) for x in (p.q, p.k, p.v))
        sinks = _dev(p.sinks if p.sinks is not None else np.zeros(1, dt))
        bwk.dropout_forward_kernel[_bgrid(tq * cfg.num_heads)](
            q, k, v, out, lse, _dev(p.rows), _dev(planning.token_rows(p.rows, tq, 0, 1)),
            *_bwd_common(p), sinks, p.sinks is not None, *_drop(p, drop_p, seed))
    if p.device == "cuda":
        if np.dtype(p.out_dtype) != dt:
            return _dev(out.copy_to_host().astype(p.out_dtype)), lse
        return out, lse
    buf = p.extra.get("out_buffer")
    if buf is not None:
        out.copy_to_host(buf)
        return buf, lse.copy_to_host()
    return out.copy_to_host(), lse.copy_to_host()


def backward(p, dout, out, lse, drop_p=0.0, seed=0, bias_shape=None):
    """The CUDA twin of cpu.launch.backward (host arrays in and out)."""
    dt = np.dtype(p.compute_dtype)
    q, k, v = (_dev(_host(x).astype(dt)) for x in (p.q, p.k, p.v))
    tq, n_heads = q.shape[0], q.shape[1]
    dq = cuda.device_array(q.shape, dt)
    dk = cuda.device_array(k.shape, dt)
    dv = cuda.device_array(v.shape, dt)
    dout_d, out_d, lse_d = (_dev(np.ascontiguousarray(x, dtype=dt)) for x in (dout, out, lse))
    delta = cuda.device_array((tq, n_heads), dt)
    common = _bwd_common(p)
    drop = (drop_p > 0.0,) + _drop(p, drop_p, seed)
    rows = _dev(p.rows)
    if tq:
        bwk.delta_kernel[_bgrid(tq * n_heads)](dout_d, out_d, delta)
        bwk.dq_kernel[_bgrid(tq * n_heads)](q, k, v, dout_d, lse_d, delta, dq, rows,
                                       _dev(planning.token_rows(p.rows, tq, 0, 1)), *common,
                                       *drop)
    if k.shape[0]:
        bwk.dkdv_kernel[_bgrid(k.shape[0] * k.shape[1])](
            q, k, v, dout_d, lse_d, delta, dk, dv, rows,
            _dev(planning.token_rows(p.rows, k.shape[0], 2, 3)), *common, *drop)
    dbias = None
    if bias_shape is not None:
        n_rows = int(np.prod(bias_shape[:3]))
        dbias_d = cuda.device_array(int(np.prod(bias_shape)), dt)
        if tq and k.shape[0]:
            bwk.dbias_kernel[_bgrid(n_rows)](q, k, v, dout_d, lse_d, delta, dbias_d,
                                        _dev(np.asarray(bias_shape, np.int64)), rows, *common,
                                        *drop)
            dbias = dbias_d.copy_to_host().reshape(bias_shape)
        else:
            dbias = np.zeros(bias_shape, dt)
    dsinks = None
    if p.sinks is not None:
        lse_h, delta_h = np.asarray(lse, dtype=dt), delta.copy_to_host() if tq else \
            np.zeros((0, n_heads), dt)
        fin = np.isfinite(lse_h)
        wgt = np.where(fin, np.exp(np.where(fin, p.sinks[None, :] - lse_h, 0.0)), 0.0)
        dsinks = -(wgt * delta_h).sum(axis=0).astype(dt)
    return dq.copy_to_host(), dk.copy_to_host(), dv.copy_to_host(), dbias, dsinks


def rms_norm(x, weight, eps):
    """``numba_attn.rms_norm`` of a device x (numba, CuPy or CAI arrays; the simulator's as
    they are): a new device array of x's shape and dtype."""
    from ..validate import as_np_dtype, compute_dtype
    from .norm import launch

    cdt = compute_dtype(as_np_dtype(x.dtype))  # checked by numba_attn.rms_norm
    xd = _device_view(x)
    if not xd.is_c_contiguous():
        raise AttentionError("x: a device array must be C-contiguous")
    wd = _device_view(weight)
    if str(wd.dtype) != str(cdt):
        wd = cuda.to_device(wd.copy_to_host().astype(cdt))
    shape = tuple(xd.shape)
    dim = shape[-1]
    n = int(np.prod(shape[:-1], dtype=np.int64))
    out = cuda.device_array(shape, dtype=xd.dtype)
    launch(xd.reshape(n, dim), wd, eps, out.reshape(n, dim))
    return out


def _device_view(a):
    """A numba device array over ``a`` (numba/CuPy/CAI arrays; simulator arrays as is)."""
    if getattr(a, "__cuda_ndarray__", False) or cuda.is_cuda_array(a) is False:
        return a if hasattr(a, "copy_to_host") else cuda.to_device(np.asarray(a))
    return cuda.as_cuda_array(a)

