"""Launch helpers for the CPU kernels: tiling, split-KV choice, work order, storage views."""
from __future__ import annotations

import numba
import numpy as np

from .. import _blas_quiet
from .._jit import jit, parallel_guard, serial_if
from ..config import AttentionConfig
from .. import planning, quant
from ..planning import make_items  # noqa: F401  (its old home)
from ..problem import CONTIGUOUS_BLOCK
from ..masking import CAUSAL_CODES
from . import backward as bwd
from . import decode
from . import forward as fk
from .simd import kernel_storage


def plan(config: AttentionConfig, max_q: int, max_k: int, batch: int, threads: int):
    """(block_q, block_k, fused) for a problem shape.

    Decode-sized items (group x queries <= 8) go to the decode kernel (``fused`` False),
    which streams whole storage rows. Otherwise an item holds ~256 rows (group x block_q)
    in strips against 256-key tiles of the fused forward; blocks shrink when that would
    leave threads idle.
    """
    group = config.group_size
    if group * max_q <= 8:
        return max(max_q, 1), 256, False
    block_q = max(1, min(max_q, 256 // group))
    while block_q > 16 and batch * config.num_kv_heads * -(-max_q // block_q) < 4 * threads:
        block_q //= 2
    return block_q, 256, True


@jit
def item_costs(items, rows, causal, wl, wr, block_k):
    """Key tiles each work item visits (its cost, up to a constant)."""
    cost = np.empty(items.shape[0], np.int64)
    for it in range(items.shape[0]):
        b = items[it, 0]
        i0 = items[it, 1] - rows[b, 0]
        i1 = items[it, 2] - rows[b, 0]
        lo, hi = fk.key_range(i0, i1, rows[b, 4], rows[b, 3], causal, wl, wr)
        cost[it] = 1 + max(hi - lo, 0) // block_k
    return cost


def order_by_cost(cost, per_item):
    """Work indices (item * per_item + sub-index) by decreasing cost of their item: the
    order the kernels' lanes take work in (forward and backward alike)."""
    return np.argsort(-np.repeat(cost, per_item), kind="stable").astype(np.int64)


def balanced_schedule(items, rows, cfg, block_k, nsplit, threads):
    """Work indices by decreasing cost; the kernel deals them round-robin to its lanes."""
    cost = item_costs(items, rows, np.int64(CAUSAL_CODES[cfg.causal]),
                      np.int64(cfg.window[0]), np.int64(cfg.window[1]), np.int64(block_k))
    return order_by_cost(cost, cfg.num_kv_heads * nsplit)


def sparse_schedule(items, rows, mods, cfg, block_k, nsplit):
    """As :func:`balanced_schedule`, with each item's cost counted in the block mask's
    non-empty key blocks (any head) over the item's query blocks."""
    nonempty = (mods.bflags != 0).any(axis=1).sum(axis=2)  # (B|1, nqb)
    b = items[:, 0] if nonempty.shape[0] > 1 else np.zeros(len(items), np.int64)
    qb0 = (items[:, 1] - rows[items[:, 0], 0]) // mods.bq
    qb1 = (items[:, 2] - 1 - rows[items[:, 0], 0]) // mods.bq
    cum = np.concatenate([np.zeros((nonempty.shape[0], 1), np.int64),
                          np.cumsum(nonempty, axis=1)], axis=1)
    cost = 1 + (cum[b, qb1 + 1] - cum[b, qb0]) * mods.bk // block_k
    per_work = np.repeat(cost, cfg.num_kv_heads * nsplit)
    return np.argsort(-per_work, kind="stable").astype(np.int64)


def choose_splits(n_work, max_k, block_k, threads):
    """Split keys when there are fewer work items than ~4 per thread and keys are many."""
    if n_work == 0 or n_work >= 4 * threads or max_k < 2 * 256:
        return 1
    want = -(-4 * threads // n_work)
    return int(max(1, min(want, max_k // 256, 64)))


SERIAL_BELOW = 1 << 19  # multiply-adds (~0.1 ms on one core): below, no parallel region

_dummy = planning.dummy


def _clear_padding(rows, out, lse):
    """Query rows no batch row owns (padding of ``q_lens``): out 0, lse -inf; no work item
    writes them, and garbage there would reach a cast or a user's ``out``."""
    if int(np.maximum(rows[:, 1], 0).sum()) >= out.shape[0]:
        return
    pad = np.ones(out.shape[0], bool)
    for b in range(rows.shape[0]):
        pad[rows[b, 0]:rows[b, 0] + max(rows[b, 1], 0)] = False
    out[pad] = 0
    lse[pad] = -np.inf


def forward(p):
    """Run the CPU forward on a dispatch.Problem; returns out (Tq, H, Dv), lse (Tq, H)."""
    cfg = p.config
    dt = p.compute_dtype
    tq = p.q.shape[0]
    out = p.extra.get("out_buffer")
    if out is None:
        out = np.empty((tq, cfg.num_heads, cfg.head_dim_v), dt)
    lse = np.empty((tq, cfg.num_heads), dt)
    if tq == 0:
        return out, lse
    _clear_padding(p.rows, out, lse)
    threads = numba.get_num_threads()
    mods = p.extra.get("mods")
    block_q, block_k, fused = plan(cfg, p.max_seqlen_q, p.max_seqlen_k, p.batch, threads)
    if mods is not None and not fused:  # the decode kernel has no mod variant: the fused
        fused = True                    # forward serves small calls too
        block_q = max(1, min(p.max_seqlen_q, 256 // cfg.group_size))
    scales = p.extra.get("kv_scales")  # an int8 cache (numba_attn.quant)
    if scales is not None and fused:  # the fused forward reads float32 copies of the rows
        p = quant.dequantized(p)
        scales = None
    items = make_items(p.rows, np.int64(block_q))
    # the decode kernel chooses and merges its own key splits
    nsplit = choose_splits(len(items) * cfg.num_kv_heads, p.max_seqlen_k, block_k,
                           threads) if fused else 1
    if nsplit > 1:
        part_out = np.empty((nsplit, tq, cfg.num_heads, cfg.head_dim_v), dt)
        part_lse = np.empty((nsplit, tq, cfg.num_heads), dt)
    else:
        part_out, part_lse = _dummy(dt, 4), _dummy(dt, 3)
    k_store, v_store = kernel_storage(p.k), kernel_storage(p.v)  # half types: bit views
    common = (p.q, k_store, v_store, out, lse, part_out, part_lse, p.rows, items,
              p.block_table, np.int64(p.block_size), *planning.options(p),
              p.sinks if p.sinks is not None else _dummy(dt), p.sinks is not None)
    # multiply-adds: tiny calls run on the calling thread alone
    work = int(np.dot(p.rows[:, 1], p.rows[:, 3])) * cfg.num_heads * (
        cfg.head_dim + cfg.head_dim_v)
    small = work < SERIAL_BELOW
    if not small:
        _blas_quiet.quiet()  # numpy's BLAS workers would spin on our cores
    with parallel_guard(), serial_if(small):
        if fused:
            schedule = balanced_schedule(items, p.rows, cfg, block_k, nsplit, threads)
            if mods is not None and mods.bflags is not None:
                schedule = sparse_schedule(items, p.rows, mods, cfg, block_k, nsplit)
            packed = p.block_size == CONTIGUOUS_BLOCK
            if packed:  # head-major copies in the storage dtype: key tiles contiguous
                kpack = np.empty((k_store.shape[1], k_store.shape[0], k_store.shape[2]),
                                 k_store.dtype)
                vpack = np.empty((v_store.shape[1], v_store.shape[0], v_store.shape[2]),
                                 v_store.dtype)
                fk.head_major(k_store, kpack)
                fk.head_major(v_store, vpack)
            else:  # paged: the kernel gathers each tile
                kpack, vpack = _dummy(k_store.dtype, 3), _dummy(v_store.dtype, 3)
            tail = (np.int64(nsplit), np.int64(block_k), schedule, np.int64(threads), kpack,
                    vpack, packed)
            if mods is None:
                fk.flash_forward(*common, *tail, None, (), None, (), None, np.int64(1),
                                 np.int64(1))
            else:
                fk.flash_forward_mods(*common, *tail, mods.smod, mods.sargs, mods.mmod,
                                      mods.margs, mods.bflags, np.int64(mods.bq),
                                      np.int64(mods.bk))
        else:  # decode-sized items: whole storage rows streamed, own key splits
            if scales is None:
                scales = (_dummy(np.float32, 2), _dummy(np.float32, 2))
                decode.flash_decode(*common, *scales, False)
            else:
                decode.flash_decode(*common, *scales, True)
        if nsplit > 1:
            fk.merge_splits(part_out, part_lse, out, lse)
    return out, lse


def merge_states(out_a, lse_a, out_b, lse_b):
    """``merge_states`` over host arrays out (lead, S, H, Dv), lse (lead, H, S) in the
    compute dtype: (out, lse), new arrays."""
    o = np.empty_like(out_a)
    lse = np.empty_like(lse_a)
    with parallel_guard():
        fk.merge_states(out_a, lse_a, out_b, lse_b, o, lse)
    return o, lse


# ---------------------------------------------------------------------------------------
# the backward and the dropout forward (kernels in cpu/backward.py)
# ---------------------------------------------------------------------------------------
BLOCK_ROWS = 64  # lanes of a work item: query rows (dq) or keys (dk, dv)
BLOCK_K = 64  # keys (dq) or queries (dk, dv) of a tile


def _dq_schedule(p, items):
    """Query items x kv heads by decreasing key tiles visited (the forward's costs)."""
    cost = item_costs(items, p.rows, *planning.codes(p), np.int64(BLOCK_K))
    return order_by_cost(cost, p.config.num_kv_heads)


def _dkdv_schedule(p, kitems):
    """Key items x kv heads by decreasing query tiles visited."""
    cost = bwd.kitem_costs(kitems, p.rows, *planning.codes(p), np.int64(BLOCK_K))
    return order_by_cost(cost, p.config.num_kv_heads)


def _mods(p):
    """(smod, sgrad, sargs, mmod, margs, bflags, bq, bk) of the Problem's mods (Nones
    without; ``bflags`` None without a block mask, whose empty tiles the kernels skip as
    the forward does)."""
    spec = p.extra.get("mods")
    if spec is None:
        return None, None, (), None, (), None, np.int64(1), np.int64(1)
    return (spec.smod, getattr(spec, "sgrad", None), spec.sargs, spec.mmod, spec.margs,
            spec.bflags, np.int64(spec.bq), np.int64(spec.bk))


def forward_dropout(p, drop_p, seed):
    """Forward with dropout of a contiguous dispatch.Problem: out (Tq, H, Dv), lse (Tq, H).

    The fused forward (unchanged) gives ``lse``; ``backward.tiled_dropout_out`` then recomputes the
    probabilities from it and sums the kept ones (``out`` of the fused forward is
    overwritten).
    """
    out, lse = forward(p)  # writes p.extra["out_buffer"] when given
    tq = p.q.shape[0]
    if tq == 0:
        return out, lse
    items = planning.blocks(p.rows, 0, 1, max(1, BLOCK_ROWS // p.config.group_size))
    out[...] = 0
    if len(items):
        with parallel_guard():
            smod, _sgrad, sargs, mmod, margs, bflags, bq, bk = _mods(p)
            kern = (bwd.tiled_dropout_out if smod is None and mmod is None
                    else bwd._MODDED["dropout"])
            kern(p.q, p.k, p.v, lse, out, p.rows, items, *planning.options(p),
                 *planning.dropout_args(p, drop_p, seed), np.int64(BLOCK_K), _dq_schedule(p, items),
                 np.int64(numba.get_num_threads()), smod, sargs, mmod, margs, bflags, bq, bk)
    return out, lse


def backward(p, dout, out, lse, drop_p=0.0, seed=0, bias_shape=None):
    """Gradients of a contiguous dispatch.Problem.

    dout / out (Tq, H, Dv) and lse (Tq, H) in the compute dtype. Returns dq, dk, dv (the
    packed shapes of q, k, v), dbias (``bias_shape``, canonical 4-D) when ``bias_shape`` is
    given, else None, and dsinks (H,) or None.
    """
    dt = p.compute_dtype
    q, k, v = p.q, p.k, p.v
    dq = np.zeros(q.shape, dt)
    dk = np.zeros(k.shape, dt)
    dv = np.zeros(v.shape, dt)
    delta = np.einsum("thc,thc->th", dout, out).astype(dt)
    common = planning.options(p)
    drop = (drop_p > 0.0,) + planning.dropout_args(p, drop_p, seed)
    dbias = None
    lanes_n = np.int64(numba.get_num_threads())
    mods = _mods(p)
    modded = mods[0] is not None or mods[3] is not None
    fmods = mods[:5]  # the dbias kernel does not skip blocks
    with parallel_guard():
        group = p.config.group_size
        items = planning.blocks(p.rows, 0, 1, max(1, BLOCK_ROWS // group))
        if len(items):
            (bwd._MODDED["dq"] if modded else bwd.tiled_dq)(
                q, k, v, dout, lse, delta, dq, p.rows, items, *common, *drop,
                np.int64(BLOCK_K), _dq_schedule(p, items), lanes_n, *mods)
        kitems = planning.blocks(p.rows, 2, 3, BLOCK_ROWS)
        if len(kitems):
            (bwd._MODDED["dkdv"] if modded else bwd.tiled_dkdv)(
                q, k, v, dout, lse, delta, dk, dv, p.rows, kitems, *common, *drop,
                np.int64(BLOCK_K), _dkdv_schedule(p, kitems), lanes_n, *mods)
        if bias_shape is not None:
            dbias = np.zeros(int(np.prod(bias_shape)), dt)
            if q.shape[0] and k.shape[0]:
                (bwd._MODDED["dbias"] if modded else bwd.bwd_dbias)(
                    q, k, v, dout, lse, delta, dbias, np.asarray(bias_shape, np.int64),
                    p.rows, *common, *drop, fmods[0], fmods[2], fmods[3], fmods[4])
            dbias = dbias.reshape(bias_shape)
    dsinks = None
    if p.sinks is not None:
        fin = np.isfinite(lse)
        w = np.where(fin, np.exp(np.where(fin, p.sinks[None, :] - lse, 0.0)), 0.0)
        dsinks = -(w * delta).sum(axis=0).astype(dt)
    return dq, dk, dv, dbias, dsinks


# ---------------------------------------------------------------------------------------
# elementwise: rotary, rms_norm (host arrays)
# ---------------------------------------------------------------------------------------
ROTARY_SERIAL_BELOW = 1 << 16  # elements: below this a decode step's rotary runs on one thread


def rotary(x, cos, sin, pos, interleaved, out=None):
    """Rotate canonical host x (T, H, D) at int64 ``pos`` (T,) by cpu/rope.py's kernel
    (tables on any device: gathered to the host in x's dtype when they are not already)."""
    from ..interop import to_numpy
    from ..validate import array_device, host
    from . import rope as cpu_rope

    cdt = x.dtype
    cos_h, sin_h = (to_numpy(n, t) if array_device(t) == "cpu" else host(n, t)
                    for n, t in (("rotary_cos", cos), ("rotary_sin", sin)))
    if (cos_h.dtype != cdt or not (cos_h.flags.writeable and sin_h.flags.writeable)
            or not (cos_h.flags.c_contiguous and sin_h.flags.c_contiguous)):
        # gather the rows needed: O(T), not O(table) (read-only tables included)
        cos_h = np.ascontiguousarray(cos_h[pos], dtype=cdt)
        sin_h = np.ascontiguousarray(sin_h[pos], dtype=cdt)
        pos = np.arange(len(pos), dtype=np.int64)
    cos_h, sin_h = np.ascontiguousarray(cos_h), np.ascontiguousarray(sin_h)
    if out is None:
        out = np.empty_like(x)
    if x.shape[0]:
        with parallel_guard(), serial_if(x.size < ROTARY_SERIAL_BELOW):
            cpu_rope.rotary(x, cos_h, sin_h, np.ascontiguousarray(pos, dtype=np.int64), out,
                            bool(interleaved))
    return out


def rms_norm(x, weight, eps, out):
    """``numba_attn.rms_norm`` of host arrays (``out`` checked by validate.check_norm_out:
    None or a writeable numpy array of x's shape and dtype, possibly a torch tensor's
    view)."""
    from ..interop import like
    from ..validate import as_np_dtype, compute_dtype, host
    from .norm import launch

    dt = as_np_dtype(x.dtype)  # checked by numba_attn.rms_norm
    cdt = compute_dtype(dt)
    dim = x.shape[-1]
    out_ref = out
    if out is not None and not isinstance(out, np.ndarray):
        from ..interop import to_numpy

        out = to_numpy("out", out)  # a view: writing it writes the tensor
    x2 = host("x", x, cdt).reshape(-1, dim)
    w = host("weight", weight, cdt)
    direct = out is not None and out.dtype == cdt and out.flags.c_contiguous
    y = out.reshape(-1, dim) if direct else np.empty_like(x2)
    launch(x2, w, cdt.type(eps), y)
    if direct:
        return out_ref
    y = y.reshape(x.shape)
    if out is not None:
        out[...] = y
        return out_ref
    return like(x, y if y.dtype == dt else y.astype(dt))

