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
