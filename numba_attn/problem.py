"""The canonical problem every backend receives, and the builders every entry point uses.

An entry point validates its arguments once (:mod:`numba_attn.validate`), describes its
rows with one of the row builders here (:func:`batched_rows`, :func:`varlen_rows`; the
kv caches build theirs from the cache lengths), packs q/k/v to ``(tokens, heads, dim)``
(:func:`pack`) and calls :func:`build_problem`; :mod:`numba_attn.dispatch` then hands the
:class:`Problem` to a backend. Forward and backward build the same Problem here, so their
alignment rules and option checks cannot differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import mods
from . import validate as va
from .config import AttentionConfig, AttentionError
from .interop import device_op

__all__ = ["Problem", "CONTIGUOUS_BLOCK", "build_problem", "batched_rows", "varlen_rows",
           "batched_dims", "varlen_dims", "pack", "set_dropout", "config_for",
           "BATCHED_LAYOUT", "VARLEN_LAYOUT", "Elementwise", "merge_operands"]

CONTIGUOUS_BLOCK = 1 << 40  # "block size" of a contiguous store: one block per row

BATCHED_LAYOUT = ("(batch, seqlen_q, num_heads, head_dim)",
                  "(batch, seqlen_k, num_kv_heads, head_dim)")
VARLEN_LAYOUT = ("(total_q, num_heads, head_dim)", "(total_k, num_kv_heads, head_dim)")


@dataclass
class Problem:
    """A validated, canonical attention problem.

    q (Tq, H, D), k (N, Hkv, D), v (N, Hkv, Dv) in the compute dtype; ``rows`` int64
    (batch, 5) = (q_start, q_len, k_start, visible k_len, offset); key ``j`` of row ``b`` is
    storage row ``k_start + block_table[b, j // block_size] * block_size + j % block_size``.
    bias/mask are flat arrays with int64 element strides over (b, h, i, j) in-row positions.
    ``extra`` carries what only some operations have: ``"mods"`` (compiled user mods),
    ``"dropout"`` ((p, seed)), ``"out_buffer"`` (the user's ``out=``) and ``"oracle"``
    (the reference backward over the caller's own arrays).
    """

    config: AttentionConfig
    q: object
    k: object
    v: object
    rows: np.ndarray
    block_table: np.ndarray
    block_size: int
    max_seqlen_q: int
    max_seqlen_k: int
    out_dtype: np.dtype
    slopes: object = None
    bias: object = None
    bias_strides: object = None
    mask: object = None
    mask_strides: object = None
    sinks: object = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def batch(self):
        return self.rows.shape[0]

    @property
    def compute_dtype(self):
        return va.compute_dtype(self.out_dtype)


# ---------------------------------------------------------------------------------------
# shapes and rows
# ---------------------------------------------------------------------------------------
def batched_dims(q, k, v):
    """(batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v) of
    batched BSHD q, k, v (ranks already checked), or an error naming the mismatch."""
    bsz, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    va.same([("q.shape[0]", bsz), ("k.shape[0]", k.shape[0]), ("v.shape[0]", v.shape[0])],
            "batch sizes")
    va.same([("k.shape[1]", sk), ("v.shape[1]", v.shape[1])], "seqlen_k of k and v")
    va.same([("k.shape[2]", hkv), ("v.shape[2]", v.shape[2])], "num_kv_heads of k and v")
    va.same([("q.shape[3]", d), ("k.shape[3]", k.shape[3])], "head_dim of q and k")
    return bsz, sq, sk, h, hkv, d, v.shape[3]


def varlen_dims(q, k, v):
    """(total_q, total_k, num_heads, num_kv_heads, head_dim, head_dim_v) of packed q, k, v."""
    tq, h, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    va.same([("k.shape[0]", tk), ("v.shape[0]", v.shape[0])], "total_k of k and v")
    va.same([("k.shape[1]", hkv), ("v.shape[1]", v.shape[1])], "num_kv_heads of k and v")
    va.same([("q.shape[2]", d), ("k.shape[2]", k.shape[2])], "head_dim of q and k")
    return tq, tk, h, hkv, d, v.shape[2]


def batched_rows(bsz, sq, sk, kv_lens, q_lens, q_offset, device):
    """The rows table of a batched (B, S, H, D) call, checked: (rows, kv_lens, q_lens),
    the lengths as int64 vectors or None."""
    kl = ql = None
    if kv_lens is not None:
        kl = va.check_int_vector("kv_lens", kv_lens, bsz, 0, sk)
    if q_lens is not None:
        ql = va.check_int_vector("q_lens", q_lens, bsz, 0, sq)
        if device != "cpu":
            raise AttentionError("q_lens: supported for host arrays only (for now); pack the "
                                 "rows and use attention_varlen on the device")
    rows = np.zeros((bsz, 5), np.int64)
    rows[:, 0] = np.arange(bsz) * sq
    rows[:, 1] = sq if ql is None else ql
    rows[:, 2] = np.arange(bsz) * sk
    rows[:, 3] = sk if kl is None else kl
    if q_offset is not None:  # chunked calls: query i sits at key position i + q_offset
        rows[:, 4] = va.check_offset("q_offset", q_offset)
    else:
        rows[:, 4] = sk - sq if ql is None else rows[:, 3] - ql
    return rows, kl, ql


def varlen_rows(cu_seqlens_q, cu_seqlens_k, tq, tk, max_seqlen_q, max_seqlen_k, kv_lens,
                q_offset=None):
    """The rows table of packed rows, checked: (rows, cu_q, cu_k, max_q, max_k, kv_lens).
    ``q_offset`` (an int) aligns every row as :func:`batched_rows` does."""
    cq = va.check_cu("cu_seqlens_q", cu_seqlens_q, tq)
    ck = va.check_cu("cu_seqlens_k", cu_seqlens_k, tk)
    if len(cq) != len(ck):
        raise AttentionError(f"cu_seqlens_q and cu_seqlens_k: lengths differ ({len(cq)} vs "
                             f"{len(ck)}); both must be batch + 1")
    bsz = len(cq) - 1
    lq, lk = np.diff(cq), np.diff(ck)
    mq = va.check_max("max_seqlen_q", max_seqlen_q, lq)
    mk = va.check_max("max_seqlen_k", max_seqlen_k, lk)
    rows = np.zeros((bsz, 5), np.int64)
    rows[:, 0] = cq[:-1]
    rows[:, 1] = lq
    rows[:, 2] = ck[:-1]
    rows[:, 3] = lk
    # chunked calls: in-row query i sits at key position i + q_offset, in every row
    rows[:, 4] = lk - lq if q_offset is None else va.check_offset("q_offset", q_offset)
    kl = None
    if kv_lens is not None:
        kl = va.check_int_vector("kv_lens", kv_lens, bsz, 0, int(lk.max(initial=0)))
        rows[:, 3] = np.minimum(lk, kl)
    return rows, cq, ck, mq, mk, kl


def pack(q, k, v, cdt, device):
    """q, k, v (batched or packed) -> (tokens, heads, dim) arrays in the compute dtype on
    the host, or views/copies on the device (the storage dtype stays; kernels accumulate
    in ``cdt``)."""
    if device != "cpu":
        return device_op("pack")(q, k, v, cdt)
    res = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        shape = x.shape
        tokens = shape[0] * shape[1] if len(shape) == 4 else shape[0]  # (no np.prod: per call)
        res.append(va.host(name, x, cdt).reshape(tokens, shape[-2], shape[-1]))
    return tuple(res)


def merge_operands(out_a, lse_a, out_b, lse_b, cdt, device):
    """merge_states' arrays (checked by ``validate.check_merge``) as out (lead, S, H, Dv)
    and lse (lead, H, S): host copies in the compute dtype, or device views (copies where
    they must be; bfloat16 outputs as their bits)."""
    if device != "cpu":
        return device_op("merge_operands")(out_a, lse_a, out_b, lse_b, cdt)
    s, h, dv = out_a.shape[-3:]
    lead = int(np.prod(out_a.shape[:-3], dtype=np.int64))
    return (va.host("out_a", out_a, cdt).reshape(lead, s, h, dv),
            va.host("lse_a", lse_a, cdt).reshape(lead, h, s),
            va.host("out_b", out_b, cdt).reshape(lead, s, h, dv),
            va.host("lse_b", lse_b, cdt).reshape(lead, h, s))


@dataclass(frozen=True)
class Elementwise:
    """What backend selection needs of an elementwise operation (``merge_states``): where
    its data lives. It has no rows, so no :class:`Problem`."""

    device: str = "cpu"


# ---------------------------------------------------------------------------------------
# the problem
# ---------------------------------------------------------------------------------------
def build_problem(*, q, k, v, rows, block_table, block_size, max_seqlen_q, max_seqlen_k,
                  batch, causal, window, scale, softcap, alibi_slopes, bias, mask, sinks,
                  has_kv_lens, out_dtype, device="cpu", score_mod=None, score_mod_args=(),
                  mask_mod=None, mask_mod_args=(), block_mask=None):
    """Config + optional inputs -> Problem (q/k/v already packed and checked).

    User mods (numba_attn.mods) are compiled here, before anything runs, and travel in
    ``p.extra["mods"]``.
    """
    h, d = q.shape[1], q.shape[2]
    hkv, dv = k.shape[1], v.shape[2]
    cfg = config_for(h, hkv, d, dv, scale, causal, window, softcap, alibi_slopes is not None,
                     bias is not None, mask is not None, has_kv_lens, sinks is not None)
    cdt = va.compute_dtype(out_dtype)
    full = (batch, h, max_seqlen_q, max_seqlen_k)
    p = Problem(
        config=cfg, q=q, k=k, v=v, rows=rows, block_table=block_table,
        block_size=int(block_size), max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), out_dtype=np.dtype(out_dtype), device=device,
        slopes=va.check_alibi(alibi_slopes, batch, h, cdt),
        sinks=va.check_sinks(sinks, h, cdt))
    va.check_representable(cfg, cdt)
    if bias is not None:
        p.bias, p.bias_strides = va.strided_operand("bias", bias, full, cdt, device)
    if mask is not None:
        p.mask, p.mask_strides = va.strided_operand("mask", mask, full, np.bool_, device)
    if score_mod is not None or mask_mod is not None or block_mask is not None or (
            mods.given(score_mod_args) or mods.given(mask_mod_args)):
        spec = mods.prepare(score_mod, score_mod_args, mask_mod, mask_mod_args, block_mask,
                            batch=batch, num_heads=h, seqlen_q=max_seqlen_q,
                            seqlen_k=max_seqlen_k, compute_dtype=cdt)
        if spec is not None:
            p.extra["mods"] = spec
    return p


def set_dropout(p, dropout):
    """Record a validated (dropout_p, seed) on the Problem when dropout is on."""
    if dropout[0] > 0.0:
        p.extra["dropout"] = dropout


def config_for(h, hkv, d, dv, scale, causal, window, softcap, *flags):
    """AttentionConfig for these values, memoised (configs are frozen; decode calls repeat)."""
    try:
        key = (h, hkv, d, dv, scale, causal, tuple(window), softcap) + flags
        hash(key)
    except TypeError:  # unhashable option: let the config report it
        key = None
    if key is not None and key in _CONFIGS:
        return _CONFIGS[key]
    cfg = AttentionConfig(
        num_heads=h, num_kv_heads=hkv, head_dim=d, head_dim_v=dv, scale=scale, causal=causal,
        window=window, softcap=softcap, has_alibi=flags[0], has_bias=flags[1],
        has_mask=flags[2], has_kv_lens=flags[3], has_sinks=flags[4])
    if key is not None and len(_CONFIGS) < 1024:
        _CONFIGS[key] = cfg
    return cfg


_CONFIGS = {}
