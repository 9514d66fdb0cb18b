"""``backend="reference"``: run a canonical dispatch.Problem through reference.attention_rows.

Keys are gathered row by row through the block table exactly as the kernels address them,
so every entry point (batched, varlen, contiguous and paged caches) has a reference path.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .reference import _dropout, attention_rows


def _to_host(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    if hasattr(x, "get"):
        return x.get()
    return np.asarray(x)


def _strided(flat, strides, b, h, lq, lk):
    """The (h, lq, lk) view of row ``b`` of a flat strided bias/mask."""
    s = [int(t) * flat.itemsize for t in strides]
    base = flat[int(strides[0]) * b:]
    return as_strided(base, shape=(h, lq, lk), strides=(s[1], s[2], s[3]), writeable=False)


def run_problem(p):
    cfg = p.config
    q = _to_host(p.q).astype(np.float64)
    # k, v: only the rows a batch row reads are cast (a cache's unwritten storage may
    # hold any bit pattern, signalling NaNs included)
    k, v = _to_host(p.k), _to_host(p.v)
    h, dv = cfg.num_heads, cfg.head_dim_v
    out = np.zeros((q.shape[0], h, dv))
    lse = np.full((q.shape[0], h), -np.inf)
    bt = _to_host(p.block_table)
    spec = p.extra.get("mods")
    smod, sargs, mmod, margs = spec.raw if spec is not None else (None, (), None, ())
    for b in range(p.batch):
        q0, lq, k0, klen, off = (int(x) for x in p.rows[b])
        lk = max(klen, 0)
        j = np.arange(lk)
        phys = k0 + bt[b, j // p.block_size].astype(np.int64) * p.block_size + j % p.block_size
        slopes = None
        if p.slopes is not None:
            sl = _to_host(p.slopes)
            slopes = sl[b if sl.shape[0] > 1 else 0]
        bias = None if p.bias is None else _strided(_to_host(p.bias), p.bias_strides, b, h, lq, lk)
        mask = None if p.mask is None else _strided(_to_host(p.mask), p.mask_strides, b, h, lq, lk)
        o, l = attention_rows(
            q[q0:q0 + lq], k[phys].astype(np.float64), v[phys].astype(np.float64), off=off,
            klen=klen, scale=cfg.scale,
            causal=cfg.causal, window=cfg.window, softcap=cfg.softcap, slopes=slopes,
            bias=bias, mask=mask, sink=_to_host(p.sinks),
            dropout=_dropout(*p.extra["dropout"], b, h, lq, lk) if "dropout" in p.extra
            else None, b=b, score_mod=smod, score_mod_args=sargs, mask_mod=mmod,
            mask_mod_args=margs)
        out[q0:q0 + lq] = o
        lse[q0:q0 + lq] = l.T
    dt = p.compute_dtype
    return out.astype(dt), lse.astype(dt)
