"""Plain numpy float64 oracle of every documented semantic rule (DESIGN.md, "Semantics").

Readable over fast: this is what every backend is tested against. It materialises the
full score matrix and loops over batch rows; never use it for speed.

Every function here returns float64 arrays; the public ``backend="reference"`` path casts
them to the input dtype.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["attention", "attention_varlen", "merge_states", "attention_rows",
           "attention_backward", "attention_varlen_backward", "attention_rows_backward"]


def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _py(f):
    return getattr(f, "py_func", f)  # a numba.njit function: its plain Python original


def _eval_mods(s, b, klen, score_mod, score_mod_args, mask_mod, mask_mod_args):
    """score_mod applied elementwise (float64) to s (H, Sq, Sk); mask_mod as (H, Sq, Sk)
    bool (None without one). Only keys j < klen are evaluated (the rest are invisible)."""
    h, sq, sk = s.shape
    keep = None
    if score_mod is not None:
        f = _py(score_mod)
        s = s.copy()
        for hh in range(h):
            for i in range(sq):
                for j in range(min(sk, klen)):
                    s[hh, i, j] = float(f(float(s[hh, i, j]), b, hh, i, j, *score_mod_args))
    if mask_mod is not None:
        g = _py(mask_mod)
        keep = np.zeros((h, sq, sk), bool)
        for hh in range(h):
            for i in range(sq):
                for j in range(min(sk, klen)):
                    keep[hh, i, j] = bool(g(b, hh, i, j, *mask_mod_args))
    return s, keep


def attention_rows(q, k, v, *, off, klen, scale, causal="bottom_right", window=(-1, -1),
                   softcap=0.0, slopes=None, bias=None, mask=None, sink=None, dropout=None,
                   b=0, score_mod=None, score_mod_args=(), mask_mod=None, mask_mod_args=()):
    """Attention for one batch row.

    q (Sq, H, D), k (Sk, Hkv, D), v (Sk, Hkv, Dv); ``off`` is the alignment offset
    (query ``i`` sits at key position ``i + off``); keys ``j >= klen`` are invisible.
    slopes (H,), bias (H, Sq, Sk) float, mask (H, Sq, Sk) bool, sink (H,); dropout
    (keep (H, Sq, Sk) bool, p): kept probabilities are scaled by 1 / (1 - p), lse is not.
    ``score_mod(score, b, h, i, j, *score_mod_args)`` is applied elementwise right after
    the scale, ``mask_mod(b, h, i, j, *mask_mod_args)`` masks with the other masks
    (numba_attn.mods); ``b`` is the row's batch index passed to them.
    Returns out (Sq, H, Dv) and lse (H, Sq), float64.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    sq, h, _ = q.shape
    sk, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    group = h // hkv
    kh = np.repeat(k, group, axis=1) if sk else np.zeros((0, h, k.shape[2]))
    vh = np.repeat(v, group, axis=1) if sk else np.zeros((0, h, dv))
    s = np.einsum("ihd,jhd->hij", q, kh) * scale  # (H, Sq, Sk)
    s, keep = _eval_mods(s, b, klen, score_mod, tuple(score_mod_args), mask_mod,
                         tuple(mask_mod_args))
    if softcap > 0.0:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    if slopes is not None:
        s = s - _f64(slopes)[:, None, None] * np.abs(i + off - j)[None]
    if bias is not None:
        s = s + _f64(bias)
    visible = np.broadcast_to(j < klen, (sq, sk))
    if causal == "bottom_right":
        visible = visible & (j <= i + off)
    elif causal == "top_left":
        visible = visible & (j <= i)
    left, right = window
    if left >= 0:
        visible = visible & (j >= i + off - left)
    if right >= 0:
        visible = visible & (j <= i + off + right)
    visible = np.broadcast_to(visible, (h, sq, sk))
    if mask is not None:
        visible = visible & np.asarray(mask, dtype=bool)
    if keep is not None:
        visible = visible & keep
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=2, initial=-np.inf)  # (H, Sq)
    if sink is not None:
        m = np.maximum(m, _f64(sink)[:, None])
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.where(visible, np.exp(s - m_safe[:, :, None]), 0.0)
    denom = p.sum(axis=2)
    if sink is not None:
        denom = denom + np.exp(_f64(sink)[:, None] - m_safe)
    if dropout is not None:
        p = p * np.asarray(dropout[0], dtype=bool) / (1.0 - dropout[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(denom > 0, m_safe + np.log(denom), -np.inf)
        out = np.einsum("hij,jhd->ihd", p, vh) / np.where(denom > 0, denom, 1.0).T[:, :, None]
    return out, lse


def _batch_slice(x, b, nb):
    """Row ``b`` of a per-batch-broadcastable 4-D array (or None)."""
    if x is None:
        return None
    x = np.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    return x[b if x.shape[0] > 1 else 0]


def _slopes_row(slopes, b, h):
    if slopes is None:
        return None
    slopes = _f64(slopes)
    return np.broadcast_to(slopes[b] if slopes.ndim == 2 else slopes, (h,))


def attention(q, k, v, *, causal=False, window=(-1, -1), scale=None, softcap=0.0,
              alibi_slopes=None, bias=None, mask=None, kv_lens=None, sinks=None,
              return_lse=False, q_offset=None, dropout_p=0.0, seed=None, score_mod=None,
              score_mod_args=(), mask_mod=None, mask_mod_args=(), q_lens=None):
    """Reference of :func:`numba_attn.attention`; q (B, Sq, H, D), k/v (B, Sk, Hkv, D[v]).

    Query ``i`` sits at key position ``i + q_offset`` (default ``Sk - Sq``). With
    ``q_lens`` row ``b`` has ``q_lens[b]`` real queries and is aligned to its real lengths
    (``off = kv_lens[b] - q_lens[b]``, unless ``q_offset`` is given); padded query rows
    give out 0 and lse -inf.
    score_mod / mask_mod are evaluated elementwise in float64 on the full score matrix.
    Returns out (B, Sq, H, Dv) float64 and, with ``return_lse``, lse (B, H, Sq).
    """
    from .config import normalize_causal

    causal = normalize_causal(causal)
    bsz, sq, h, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = np.zeros((bsz, sq, h, v.shape[3]))
    lse = np.full((bsz, h, sq), -np.inf)
    for b in range(bsz):
        ql, klen, off = _row_lengths(b, sq, sk, q_lens, kv_lens, q_offset)
        bias_b = _batch_slice(bias, b, bsz)
        mask_b = _batch_slice(mask, b, bsz)
        drop = _dropout(dropout_p, seed, b, h, sq, sk)
        out[b, :ql], lse[b, :, :ql] = attention_rows(
            q[b, :ql], k[b], v[b], off=off, klen=klen,
            scale=scale, causal=causal, window=tuple(window), softcap=float(softcap),
            slopes=_slopes_row(alibi_slopes, b, h),
            bias=None if bias_b is None else np.broadcast_to(bias_b, (h, sq, sk))[:, :ql],
            mask=None if mask_b is None else np.broadcast_to(mask_b, (h, sq, sk))[:, :ql],
            sink=sinks, dropout=None if drop is None else (drop[0][:, :ql], drop[1]), b=b,
            score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
            mask_mod_args=mask_mod_args)
    return (out, lse) if return_lse else out


def _row_lengths(b, sq, sk, q_lens, kv_lens, q_offset):
    """(real queries, real keys, alignment offset) of batch row ``b``."""
    ql = sq if q_lens is None else int(q_lens[b])
    klen = sk if kv_lens is None else int(kv_lens[b])
    if q_offset is not None:
        off = int(q_offset)
    else:
        off = sk - sq if q_lens is None else klen - ql
    return ql, klen, off


def _dropout(dropout_p, seed, b, h, lq, lk):
    """(keep (h, lq, lk), p) of batch row ``b``, or None without dropout."""
    if not dropout_p:
        return None
    from .dropout import keep_mask

    keep = keep_mask(seed, b, np.arange(h)[:, None, None], np.arange(lq)[None, :, None],
                     np.arange(lk)[None, None, :], dropout_p)
    return keep, float(dropout_p)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                     max_seqlen_k=None, causal=False, window=(-1, -1), scale=None,
                     softcap=0.0, alibi_slopes=None, bias=None, mask=None, kv_lens=None,
                     sinks=None, return_lse=False, dropout_p=0.0, seed=None, score_mod=None,
                     score_mod_args=(), mask_mod=None, mask_mod_args=(), q_offset=None):
    """Reference of :func:`numba_attn.attention_varlen`; q (Tq, H, D), k/v (Tk, Hkv, D[v]).

    Row ``b`` owns queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and keys likewise; its
    alignment offset is ``len_k - len_q``, or ``q_offset`` in every row when given. bias/mask broadcast to
    (batch, H, max_seqlen_q, max_seqlen_k) and are indexed by in-row positions.
    Returns out (Tq, H, Dv) and, with ``return_lse``, lse (H, Tq).
    """
    from .config import normalize_causal

    causal = normalize_causal(causal)
    h, d = q.shape[1], q.shape[2]
    cq = np.asarray(cu_seqlens_q)
    ck = np.asarray(cu_seqlens_k)
    bsz = len(cq) - 1
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = np.zeros((q.shape[0], h, v.shape[2]))
    lse = np.full((h, q.shape[0]), -np.inf)
    for b in range(bsz):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        lq, lk = q1 - q0, k1 - k0
        bias_b = _batch_slice(bias, b, bsz)
        mask_b = _batch_slice(mask, b, bsz)
        klen = lk if kv_lens is None else min(lk, int(kv_lens[b]))
        out[q0:q1], lse[:, q0:q1] = attention_rows(
            q[q0:q1], k[k0:k1], v[k0:k1], off=lk - lq if q_offset is None else int(q_offset),
            klen=klen, scale=scale,
            causal=causal, window=tuple(window), softcap=float(softcap),
            slopes=_slopes_row(alibi_slopes, b, h),
            bias=None if bias_b is None else _crop(bias_b, h, lq, lk),
            mask=None if mask_b is None else _crop(mask_b, h, lq, lk),
            sink=sinks, dropout=_dropout(dropout_p, seed, b, h, lq, lk), b=b,
            score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
            mask_mod_args=mask_mod_args)
    return (out, lse) if return_lse else out


def _crop(x, h, lq, lk):
    """Broadcast a (h|1, Sq|1, Sk|1) array and keep the first lq x lk positions."""
    x = np.asarray(x)
    full = np.broadcast_to(x, (h, max(x.shape[1], lq), max(x.shape[2], lk)))
    return full[:, :lq, :lk]


def merge_states(out_a, lse_a, out_b, lse_b):
    """Reference of :func:`numba_attn.merge_states`.

    out (..., S, H, Dv) with lse (..., H, S); merging with an empty part (lse = -inf) is
    the identity; two empty parts give out = 0, lse = -inf.
    """
    out_a, lse_a, out_b, lse_b = map(_f64, (out_a, lse_a, out_b, lse_b))
    lse = np.logaddexp(lse_a, lse_b)
    fin = np.isfinite(lse)
    lse_safe = np.where(fin, lse, 0.0)
    wa = np.where(fin, np.exp(lse_a - lse_safe), 0.0)
    wb = np.where(fin, np.exp(lse_b - lse_safe), 0.0)
    # lse (..., H, S) -> weights (..., S, H, 1)
    wa = np.swapaxes(wa, -1, -2)[..., None]
    wb = np.swapaxes(wb, -1, -2)[..., None]
    return wa * out_a + wb * out_b, lse


# ---------------------------------------------------------------------------------------
# backward (FlashAttention-2's formulas, materialised)
# ---------------------------------------------------------------------------------------
def _mod_derivative(f, fgrad, s, b, h, i, j, args):
    """d score_mod / d score at one point: ``fgrad`` when given; else the complex step of
    the Python function where it agrees with a finite difference, else the finite
    difference (five-point, float64)."""
    if fgrad is not None:
        return float(_py(fgrad)(s, b, h, i, j, *args))
    step = 1e-3 * max(1.0, abs(s))

    def at(x):
        return float(f(float(x), b, h, i, j, *args))

    fd = (8.0 * (at(s + step) - at(s - step)) - (at(s + 2 * step) - at(s - 2 * step))) / (
        12.0 * step)
    try:
        cs = complex(f(complex(s, 1e-30), b, h, i, j, *args)).imag * 1e30
    except (TypeError, ValueError):
        return fd
    return cs if abs(cs - fd) <= 1e-5 * max(1.0, abs(fd)) else fd


def _eval_mods_grad(s, b, klen, score_mod, score_mod_args, mask_mod, mask_mod_args,
                    score_mod_grad):
    """As :func:`_eval_mods`, also returning d score_mod / d score (ones without)."""
    dmod = np.ones_like(s)
    if score_mod is not None:
        f = _py(score_mod)
        h, sq, sk = s.shape
        for hh in range(h):
            for i in range(sq):
                for j in range(min(sk, klen)):
                    dmod[hh, i, j] = _mod_derivative(f, score_mod_grad, float(s[hh, i, j]),
                                                     b, hh, i, j, score_mod_args)
    s, keep = _eval_mods(s, b, klen, score_mod, score_mod_args, mask_mod, mask_mod_args)
    return s, keep, dmod


def _scores(q, kh, *, off, klen, scale, causal, window, softcap, slopes, bias, mask, b=0,
            score_mod=None, score_mod_args=(), mask_mod=None, mask_mod_args=(),
            score_mod_grad=None):
    """Scores of one batch row, (H, Sq, Sk), -inf where invisible; also ds/ds_raw of the
    score_mod and soft-cap (f'(s) * (1 - tanh^2), or 1) and the visibility."""
    sq, h, _ = q.shape
    sk = kh.shape[0]
    s = np.einsum("ihd,jhd->hij", q, kh) * scale
    s, keep, dcap = _eval_mods_grad(s, b, klen, score_mod, tuple(score_mod_args), mask_mod,
                                    tuple(mask_mod_args), score_mod_grad)
    if softcap > 0.0:
        t = np.tanh(s / softcap)
        s = softcap * t
        dcap = dcap * (1.0 - t * t)
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    if slopes is not None:
        s = s - _f64(slopes)[:, None, None] * np.abs(i + off - j)[None]
    if bias is not None:
        s = s + _f64(bias)
    visible = np.broadcast_to(j < klen, (sq, sk))
    if causal == "bottom_right":
        visible = visible & (j <= i + off)
    elif causal == "top_left":
        visible = visible & (j <= i)
    left, right = window
    if left >= 0:
        visible = visible & (j >= i + off - left)
    if right >= 0:
        visible = visible & (j <= i + off + right)
    visible = np.broadcast_to(visible, (h, sq, sk))
    if mask is not None:
        visible = visible & np.asarray(mask, dtype=bool)
    if keep is not None:
        visible = visible & keep
    return np.where(visible, s, -np.inf), dcap, visible


def attention_rows_backward(dout, q, k, v, out, lse, *, off, klen, scale,
                            causal="bottom_right", window=(-1, -1), softcap=0.0, slopes=None,
                            bias=None, mask=None, sink=None, dropout=None, b=0,
                            score_mod=None, score_mod_args=(), mask_mod=None,
                            mask_mod_args=(), score_mod_grad=None):
    """Gradients of one batch row (arguments as :func:`attention_rows`; ``score_mod_grad``
    is d score_mod / d score, derived from the Python score_mod when not given).

    dout, out (Sq, H, Dv); lse (H, Sq) as the forward returned it. Returns dq (Sq, H, D),
    dk (Sk, Hkv, D), dv (Sk, Hkv, Dv), dscores (H, Sq, Sk) (= d bias) and dsink (H,):
    ``p = exp(s - lse)``, ``delta = rowsum(dout * out)``, ``ds = p (dp - delta)``,
    ``dsink = -sum_i exp(sink - lse_i) delta_i``; dk/dv summed over each group's heads.
    """
    dout, q, k, v, out, lse = map(_f64, (dout, q, k, v, out, lse))
    _sq, h, d = q.shape
    sk, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    group = h // hkv
    kh = np.repeat(k, group, axis=1) if sk else np.zeros((0, h, d))
    vh = np.repeat(v, group, axis=1) if sk else np.zeros((0, h, dv))
    s, dcap, visible = _scores(q, kh, off=off, klen=klen, scale=scale, causal=causal,
                               window=tuple(window), softcap=float(softcap), slopes=slopes,
                               bias=bias, mask=mask, b=b, score_mod=score_mod,
                               score_mod_args=score_mod_args, mask_mod=mask_mod,
                               mask_mod_args=mask_mod_args, score_mod_grad=score_mod_grad)
    fin = np.isfinite(lse)
    lse_safe = np.where(fin, lse, 0.0)
    p = np.where(visible & fin[:, :, None], np.exp(s - lse_safe[:, :, None]), 0.0)
    mult = 1.0
    if dropout is not None:
        mult = np.asarray(dropout[0], dtype=bool) / (1.0 - dropout[1])
    pd = p * mult  # the probabilities the forward multiplied V by
    dvh = np.einsum("hij,ihd->jhd", pd, dout)
    dp = np.einsum("ihd,jhd->hij", dout, vh) * mult
    delta = np.einsum("ihd,ihd->hi", dout, out)
    ds = p * (dp - delta[:, :, None])
    dsink = np.zeros(h)
    if sink is not None:
        dsink = -np.sum(np.where(fin, np.exp(_f64(sink)[:, None] - lse_safe), 0.0) * delta,
                        axis=1)
    dsr = ds * dcap * scale
    dq = np.einsum("hij,jhd->ihd", dsr, kh)
    dkh = np.einsum("hij,ihd->jhd", dsr, q)
    dk = dkh.reshape(sk, hkv, group, d).sum(axis=2)
    dvv = dvh.reshape(sk, hkv, group, dv).sum(axis=2)
    return dq, dk, dvv, ds, dsink


def _reduce_to(full, shape):
    """Sum a (B, H, Sq, Sk) gradient down to the broadcastable ``shape`` it came from."""
    shape = tuple(shape)
    four = (1,) * (4 - len(shape)) + shape
    axes = tuple(a for a in range(4) if four[a] == 1 and full.shape[a] != 1)
    red = full.sum(axis=axes, keepdims=True) if axes else full
    return red[tuple(slice(0, n) for n in four)].reshape(shape)


def attention_backward(dout, q, k, v, out, lse, *, causal=False, window=(-1, -1), scale=None,
                       softcap=0.0, alibi_slopes=None, bias=None, mask=None, kv_lens=None,
                       sinks=None, dropout_p=0.0, seed=None, q_lens=None, q_offset=None,
                       score_mod=None, score_mod_args=(), mask_mod=None, mask_mod_args=(),
                       score_mod_grad=None):
    """Reference of :func:`numba_attn.attention_backward`.

    Returns (dq, dk, dv, dbias, dsinks), float64; dbias has the shape ``bias`` was given
    in (None without bias), dsinks (H,) (None without sinks). ``q_lens`` / ``q_offset``
    as :func:`attention`; padded query rows get zero gradients.
    """
    from .config import normalize_causal

    causal = normalize_causal(causal)
    bsz, sq, h, d = q.shape
    sk, _hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dq = np.zeros(q.shape)
    dk = np.zeros(k.shape)
    dv = np.zeros(v.shape)
    dbias = np.zeros((bsz, h, sq, sk))
    dsinks = np.zeros(h)
    for b in range(bsz):
        ql, klen, off = _row_lengths(b, sq, sk, q_lens, kv_lens, q_offset)
        bias_b = _batch_slice(bias, b, bsz)
        mask_b = _batch_slice(mask, b, bsz)
        drop = _dropout(dropout_p, seed, b, h, sq, sk)
        r = attention_rows_backward(
            dout[b, :ql], q[b, :ql], k[b], v[b], out[b, :ql], _f64(lse[b])[:, :ql], off=off,
            klen=klen, scale=scale, causal=causal,
            window=tuple(window), softcap=float(softcap),
            slopes=_slopes_row(alibi_slopes, b, h),
            bias=None if bias_b is None else np.broadcast_to(bias_b, (h, sq, sk))[:, :ql],
            mask=None if mask_b is None else np.broadcast_to(mask_b, (h, sq, sk))[:, :ql],
            sink=sinks, dropout=None if drop is None else (drop[0][:, :ql], drop[1]), b=b,
            score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
            mask_mod_args=mask_mod_args, score_mod_grad=score_mod_grad)
        dq[b, :ql], dk[b], dv[b], dbias[b, :, :ql] = r[:4]
        dsinks += r[4]
    return (dq, dk, dv, None if bias is None else _reduce_to(dbias, np.shape(bias)),
            None if sinks is None else dsinks)


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              max_seqlen_q=None, max_seqlen_k=None, causal=False,
                              window=(-1, -1), scale=None, softcap=0.0, alibi_slopes=None,
                              bias=None, mask=None, kv_lens=None, sinks=None, dropout_p=0.0,
                              seed=None, score_mod=None, score_mod_args=(), mask_mod=None,
                              mask_mod_args=(), score_mod_grad=None, q_offset=None):
    """Reference of :func:`numba_attn.attention_varlen_backward`; lse (H, Tq); ``q_offset``
    as :func:`attention_varlen`.

    Returns (dq, dk, dv, dbias, dsinks) as :func:`attention_backward`; dbias positions
    beyond a row's lengths get zero gradient.
    """
    from .config import normalize_causal

    causal = normalize_causal(causal)
    h, d = q.shape[1], q.shape[2]
    cq = np.asarray(cu_seqlens_q)
    ck = np.asarray(cu_seqlens_k)
    bsz = len(cq) - 1
    lq_all, lk_all = np.diff(cq), np.diff(ck)
    mq = int(lq_all.max(initial=0)) if max_seqlen_q is None else int(max_seqlen_q)
    mk = int(lk_all.max(initial=0)) if max_seqlen_k is None else int(max_seqlen_k)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    lse = _f64(lse)
    dq = np.zeros(q.shape)
    dk = np.zeros(k.shape)
    dv = np.zeros(v.shape)
    dbias = np.zeros((bsz, h, mq, mk))
    dsinks = np.zeros(h)
    for b in range(bsz):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        lq, lk = q1 - q0, k1 - k0
        bias_b = _batch_slice(bias, b, bsz)
        mask_b = _batch_slice(mask, b, bsz)
        klen = lk if kv_lens is None else min(lk, int(kv_lens[b]))
        r = attention_rows_backward(
            dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1],
            off=lk - lq if q_offset is None else int(q_offset), klen=klen, scale=scale,
            causal=causal, window=tuple(window), softcap=float(softcap),
            slopes=_slopes_row(alibi_slopes, b, h),
            bias=None if bias_b is None else _crop(bias_b, h, lq, lk),
            mask=None if mask_b is None else _crop(mask_b, h, lq, lk),
            sink=sinks, dropout=_dropout(dropout_p, seed, b, h, lq, lk), b=b,
            score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
            mask_mod_args=mask_mod_args, score_mod_grad=score_mod_grad)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = r[:3]
        dbias[b, :, :lq, :lk] = r[3]
        dsinks += r[4]
    return (dq, dk, dv, None if bias is None else _reduce_to(dbias, np.shape(bias)),
            None if sinks is None else dsinks)
