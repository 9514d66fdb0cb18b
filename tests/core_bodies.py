"""One body per core operation, run over backends x dtypes x shapes.

``tests/test_core_ops.py`` runs them on every usable host backend; ``tests/cuda_sim/
test_core_ops_sim.py`` runs the same bodies with device arrays and its own (smaller)
shapes under the CUDA simulator. Each body computes the operation through the public API
on ``backend`` and compares it with numba_attn.reference (float64) at the dtype's
tolerance (tests/numerics.py); ``to_dev`` / ``to_host`` move arrays for device runs.
"""
from __future__ import annotations

import numpy as np

import numba_attn as na
from numba_attn import reference as ref

from numerics import assert_close

# (name, (batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v), options)
HOST_SHAPES = [
    ("mha", (2, 17, 33, 2, 2, 16, 16), {}),
    ("gqa-causal", (1, 40, 40, 4, 2, 32, 32), dict(causal=True)),
    ("mqa-decode", (2, 1, 70, 4, 1, 16, 16), {}),
    ("sq>sk-window-dv", (1, 9, 5, 2, 1, 8, 12), dict(causal=True, window=(2, 0))),
    ("softcap-alibi-sinks", (1, 12, 20, 2, 2, 16, 16),
     dict(softcap=3.0, alibi_slopes=True, sinks=True)),
]

DTYPES = (np.float32, np.float64, np.float16)


def _ident(x):
    return x


def make(rng, shape, dtype, opts):
    b, sq, sk, h, hkv, d, dv = shape
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hkv, dv)).astype(dtype)
    o = dict(opts)
    if o.pop("alibi_slopes", False):
        o["alibi_slopes"] = rng.random(h)
    if o.pop("sinks", False):
        o["sinks"] = rng.standard_normal(h)
    return q, k, v, o


def forward(rng, backend, dtype, shape, opts, to_dev=_ident, to_host=np.asarray):
    """attention(...) and its lse against the oracle."""
    q, k, v, o = make(rng, shape, dtype, opts)
    out, lse = na.attention(to_dev(q), to_dev(k), to_dev(v), return_lse=True,
                            backend=backend, **o)
    e_out, e_lse = ref.attention(q, k, v, return_lse=True, **o)
    assert to_host(out).dtype == np.dtype(dtype)
    assert_close(to_host(out), e_out, dtype)
    assert_close(to_host(lse), e_lse, dtype, "lse")


def varlen(rng, backend, dtype, shape, opts, to_dev=_ident, to_host=np.asarray):
    """attention_varlen over rows of different lengths (one empty) against the oracle,
    row by row through reference.attention."""
    b, sq, sk, h, hkv, d, dv = shape
    lq = rng.integers(0, sq + 1, b + 1)
    lk = np.maximum(rng.integers(0, sk + 1, b + 1), lq if opts.get("causal") else 0)
    lq[0] = 0  # an empty query row
    cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    q, k, v, o = make(rng, (1, int(cq[-1]), int(ck[-1]), h, hkv, d, dv), dtype, opts)
    q, k, v = q[0], k[0], v[0]
    out, lse = na.attention_varlen(to_dev(q), to_dev(k), to_dev(v), cq, ck, return_lse=True,
                                   backend=backend, **o)
    e_out = np.zeros(out.shape)
    e_lse = np.full((h, q.shape[0]), -np.inf)
    for r in range(b + 1):
        qs, ks = slice(cq[r], cq[r + 1]), slice(ck[r], ck[r + 1])
        if cq[r] == cq[r + 1]:
            continue
        eo, el = ref.attention(q[None, qs], k[None, ks], v[None, ks], return_lse=True, **o)
        e_out[qs], e_lse[:, qs] = eo[0], el[0]
    assert_close(to_host(out), e_out, dtype)
    assert_close(to_host(lse), e_lse, dtype, "lse")


def backward(rng, backend, dtype, shape, opts, to_dev=_ident, to_host=np.asarray):
    """attention_backward (dq, dk, dv, dsinks when sinks) against the oracle's backward,
    on the oracle's own out and lse (so only the backward is under test)."""
    q, k, v, o = make(rng, shape, dtype, opts)
    out, lse = ref.attention(q, k, v, return_lse=True, **o)
    dout = rng.standard_normal(out.shape)
    extra = dict(return_dsinks=True) if "sinks" in o else {}
    args = [x.astype(dtype) for x in (dout, q, k, v, out)] + [lse.astype(
        np.float64 if dtype == np.float64 else np.float32)]
    got = na.attention_backward(*(to_dev(a) for a in args), backend=backend, **o, **extra)
    dq, dk, dv, _dbias, dsinks = ref.attention_backward(*args, **o)
    exp = (dq, dk, dv) + ((dsinks,) if extra else ())
    assert len(got) == len(exp)
    for name, g, e in zip(("dq", "dk", "dv", "dsinks"), got, exp):
        # gradients sum over many terms: the half-precision tolerance scales with their size
        scale = max(1.0, float(np.abs(e).max(initial=0.0)))
        assert_close(to_host(g) / scale, np.asarray(e) / scale, dtype, name)


def merge(rng, backend, dtype, shape, opts, to_dev=_ident, to_host=np.asarray):
    """merge_states of two key halves equals attention over all keys (oracle)."""
    q, k, v, o = make(rng, shape, dtype, {})
    sk = k.shape[1]
    cut = sk // 2
    oa, la = ref.attention(q, k[:, :cut], v[:, :cut], return_lse=True)
    ob, lb = ref.attention(q, k[:, cut:], v[:, cut:], return_lse=True)
    ldt = np.float64 if dtype == np.float64 else np.float32
    got_o, got_l = na.merge_states(to_dev(oa.astype(dtype)), to_dev(la.astype(ldt)),
                                   to_dev(ob.astype(dtype)), to_dev(lb.astype(ldt)))
    e_o, e_l = ref.attention(q, k, v, return_lse=True)
    assert_close(to_host(got_o), e_o, dtype)
    assert_close(to_host(got_l), e_l, dtype, "lse")


OPERATIONS = {"forward": forward, "varlen": varlen, "backward": backward, "merge": merge}
