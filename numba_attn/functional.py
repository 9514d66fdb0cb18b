"""The public attention functions: validate once, build a dispatch.Problem, run, reshape.

Named by input form, as FlashAttention's interface: :func:`attention` (batched BSHD),
:func:`attention_varlen` (packed rows with ``cu_seqlens``) and :func:`merge_states`.
"""
from __future__ import annotations

import numpy as np

from . import dispatch as dp
from ._jit import parallel_guard
from .config import AttentionConfig, AttentionError, check_flag, check_int
from . import autograd
from .autograd import wants_grad
from .dropout import check_dropout
from .interop import Array, is_torch, like, to_numpy
from . import layout as lay
from . import mods
from .mods import BlockMask, MaskMod, ScoreMod

__all__ = ["attention", "attention_varlen", "merge_states"]

def build_problem(*, q, k, v, rows, block_table, block_size, max_seqlen_q, max_seqlen_k,
                  batch, causal, window, scale, softcap, alibi_slopes, bias, mask, sinks,
                  has_kv_lens, out_dtype, device="cpu", score_mod=None, score_mod_args=(),
                  mask_mod=None, mask_mod_args=(), block_mask=None):
    """Config + optional inputs -> dispatch.Problem (q/k/v already packed and checked).

    User mods (numba_attn.mods) are compiled here, before anything runs, and travel in
    ``p.extra["mods"]``.
    """
    h, d = q.shape[1], q.shape[2]
    hkv, dv = k.shape[1], v.shape[2]
    cfg = _config(h, hkv, d, dv, scale, causal, window, softcap, alibi_slopes is not None,
                  bias is not None, mask is not None, has_kv_lens, sinks is not None)
    cdt = dp.compute_dtype(out_dtype)
    full = (batch, h, max_seqlen_q, max_seqlen_k)
    p = dp.Problem(
        config=cfg, q=q, k=k, v=v, rows=rows, block_table=block_table,
        block_size=int(block_size), max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), out_dtype=np.dtype(out_dtype), device=device,
        slopes=dp.check_alibi(alibi_slopes, batch, h, cdt),
        sinks=dp.check_sinks(sinks, h, cdt))
    check_representable(cfg, cdt)
    if bias is not None:
        p.bias, p.bias_strides = dp.strided_operand("bias", bias, full, cdt, device)
    if mask is not None:
        p.mask, p.mask_strides = dp.strided_operand("mask", mask, full, np.bool_, device)
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


def check_representable(cfg, cdt):
    """scale and softcap must stay finite (and scale > 0) in the compute dtype ``cdt``:
    1e39 is a finite Python float but inf in float32, which would make every row NaN."""
    info = np.finfo(cdt)
    big, tiny = float(info.max), float(info.tiny)
    for name, val in (("scale", cfg.scale), ("softcap", cfg.softcap)):
        if abs(val) > big or (val != 0.0 and abs(val) < tiny):
            raise AttentionError(f"{name}: {val!r} is not representable in {cdt} (the "
                                 f"compute dtype, range [{info.tiny:.3g}, {info.max:.3g}])")


def _config(h, hkv, d, dv, scale, causal, window, softcap, *flags):
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


def check_out(out, shape, dtype):
    """Validate a user ``out=`` array; returns it (or None)."""
    if out is None:
        return None
    if dp.array_device(out) != "cpu":
        from .cuda import dispatch_cuda

        return dispatch_cuda.check_out(out, shape, dtype)
    if is_torch(out):
        out = to_numpy("out", out)  # a view: writing it writes the tensor
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise AttentionError(f"out: expected shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype} (the dtype of q), got {out.dtype}")
    if not out.flags.writeable:
        raise AttentionError("out: array is read-only")
    return out


def run_and_finish(p, backend, out, out_shape):
    """Run; write into ``out`` (or a new array) of ``out_shape``; lse stays (Tq, H)."""
    if out is not None and dp.array_device(out) != "cpu":
        from .cuda import dispatch_cuda

        return dispatch_cuda.run_into(p, backend, out, out_shape)
    direct = (out is not None and out.flags.c_contiguous and out.dtype == p.compute_dtype
              and backend != "reference")
    if direct:
        p.extra["out_buffer"] = out.reshape(p.q.shape[0], p.config.num_heads,
                                            p.config.head_dim_v)
    o, lse = dp.run(p, backend)
    if direct:
        return out, lse
    o = o.reshape(out_shape)
    if out is None:
        return (o if o.dtype == p.out_dtype else o.astype(p.out_dtype)), lse
    out[...] = o
    return out, lse


def canon_qkv(q, k, v, ndim, layout_q, layout_kv):
    """Rank/dtype checks shared by the entry points; returns (dtype, compute dtype)."""
    dp.check_rank("q", q, ndim, layout_q)
    dp.check_rank("k", k, ndim, layout_kv)
    dp.check_rank("v", v, ndim, layout_kv.replace("head_dim", "head_dim_v"))
    dt = dp.check_float("q", q)
    for name, x in (("k", k), ("v", v)):
        if dp.as_np_dtype(x.dtype) != dt:
            raise TypeError(f"{name}: dtype {x.dtype} differs from q's {dt}; "
                            f"cast all of q, k, v to one dtype")
    devs = {name: dp.array_device(x) for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(devs.values())) > 1:
        raise AttentionError("q, k, v: mixed devices " + ", ".join(f"{n} on {d}" for n, d in
                                                                 devs.items()))
    return dt, dp.compute_dtype(dt), devs["q"]


@lay.entry("q", "k", "v", "out")
def attention(q: Array, k: Array, v: Array, *, causal: bool | str = False,
              window: tuple[int, int] = (-1, -1), scale: float | None = None,
              softcap: float = 0.0, alibi_slopes: Array | None = None,
              bias: Array | None = None, mask: Array | None = None,
              kv_lens: Array | None = None, q_lens: Array | None = None,
              sinks: Array | None = None, return_lse: bool = False,
              out: Array | None = None, dropout_p: float = 0.0, seed: int | None = None,
              score_mod: ScoreMod | None = None,
              score_mod_args: tuple = (), mask_mod: MaskMod | None = None,
              mask_mod_args: tuple = (), block_mask: BlockMask | None = None,
              backend: str = "auto",
              q_offset: int | None = None,
              score_mod_grad=None,
              layout: str = "bshd") -> Array | tuple[Array, Array]:
    """Scaled dot-product attention over batched BSHD arrays, flash-attention style.

    Parameters
    ----------
    q : array (batch, seqlen_q, num_heads, head_dim)
    k : array (batch, seqlen_k, num_kv_heads, head_dim)
    v : array (batch, seqlen_k, num_kv_heads, head_dim_v)
        float16, bfloat16, float32 or float64, one dtype for all three.
        ``num_heads % num_kv_heads == 0`` (GQA/MQA); query head ``h`` reads kv head
        ``h // (num_heads // num_kv_heads)``.
    causal : bool or {"bottom_right", "top_left"}, default False
        ``True`` = bottom-right aligned: query ``i`` sees keys ``j <= i + seqlen_k -
        seqlen_q`` (FlashAttention). ``"top_left"``: ``j <= i`` (PyTorch's ``is_causal``).
    window : (int, int), default (-1, -1)
        Sliding window (left, right) around ``i + seqlen_k - seqlen_q``; -1 means unbounded.
    scale : float, default 1 / sqrt(head_dim)
    softcap : float, default 0.0
        When > 0, scores become ``softcap * tanh(s / softcap)`` (after scaling). 0 = off.
    alibi_slopes : array (num_heads,) or (batch, num_heads), optional
        Adds ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scores.
    bias : float array broadcastable to (batch, num_heads, seqlen_q, seqlen_k), optional
        Added to the scores after softcap and ALiBi.
    mask : bool array broadcastable to (batch, num_heads, seqlen_q, seqlen_k), optional
        True = may attend.
    kv_lens : int array (batch,), optional
        Key padding: row ``b`` sees only keys ``j < kv_lens[b]``. Alone it keeps the
        alignment of the padded shapes (see Notes).
    q_lens : int array (batch,), optional
        Query padding (right-padded rows): row ``b`` has ``q_lens[b]`` real queries. With
        ``q_lens``, every row is aligned to its real lengths (``off = kv_lens[b] -
        q_lens[b]``, ``kv_lens`` defaulting to seqlen_k), so a padded batch gives, row by
        row, exactly what each unpadded row gives alone (FlashAttention's padded
        semantics); padded query rows give out 0 and lse -inf. Host arrays only.
    sinks : array (num_heads,), optional
        Attention-sink logits (natural log, unscaled): an extra ``exp(sink[h])`` in the
        softmax denominator that contributes no value.
    return_lse : bool, default False
        Also return the log-sum-exp of the scores, shape (batch, num_heads, seqlen_q).
    out : ndarray (batch, seqlen_q, num_heads, head_dim_v), optional
        Written in place and returned.
    dropout_p : float in [0, 1), default 0.0
        Attention dropout (training): probabilities are kept with probability
        ``1 - dropout_p`` and scaled by ``1 / (1 - dropout_p)`` (``lse`` is not affected).
        The keep bit of (b, h, i, j) is a pure function of (seed, b, h, i, j)
        (:mod:`numba_attn.dropout`), so :func:`attention_backward` regenerates it; CPU,
        CUDA and reference backends agree on it bit for bit. 0 runs the unchanged kernels.
    seed : int in [0, 2**63), optional
        Dropout seed, required when ``dropout_p > 0``.
    score_mod : function ``(score, b, h, q_idx, kv_idx, *score_mod_args) -> float``, optional
        Plain Python (or ``numba.njit``), compiled into the kernel; rewrites each scaled
        score before softcap, ALiBi and bias. ``h`` is the query head; ``q_idx``, ``kv_idx``
        are in-row positions. See :mod:`numba_attn.mods`.
    score_mod_args : tuple, default ()
        Arrays / scalars passed to ``score_mod`` (contents may change between calls with no
        recompile).
    score_mod_grad : function ``(score, b, h, q_idx, kv_idx, *score_mod_args) -> float``, optional
        d score_mod / d score, used only by the backward (torch autograd here; see
        :func:`numba_attn.attention_vjp`) when the automatic derivative cannot serve.
    mask_mod : function ``(b, h, q_idx, kv_idx, *mask_mod_args) -> bool``, optional
        True = may attend; combined with the other masks.
    mask_mod_args : tuple, default ()
    block_mask : BlockMask, optional
        From :func:`numba_attn.create_block_mask`: empty blocks are skipped, ``mask_mod``
        (carried by the block mask) runs only on partial ones.
    backend : {"auto", "cpu", "cuda", "reference"}, default "auto"
        "auto" runs where the data lives. Mods run on every backend (CUDA: their
        ``*_mod_args`` arrays are host arrays, copied per call).
    q_offset : int, default seqlen_k - seqlen_q
        Key position of query 0: query ``i`` sits at key position ``i + q_offset``. It
        replaces ``seqlen_k - seqlen_q`` in ``causal=True``, ``window`` and ALiBi (any int;
        ``causal="top_left"`` stays ``j <= i``). For a block of a longer sequence, e.g.
        queries ``qa:qb`` against keys ``ka:kb`` of a bottom-right call, pass
        ``qa + seqlen_k - seqlen_q - ka`` (chunked prefill, key-split context parallelism).
    layout : {"bshd", "bhsd"}, default "bshd"
        "bhsd": q, k, v and out= are (batch, heads, seq, dim) (torch's habit) and out comes
        back so too, as a transposed view (no copy of the result). See
        :mod:`numba_attn.layout`.

    Returns
    -------
    out : array (batch, seqlen_q, num_heads, head_dim_v), dtype of q
    lse : array (batch, num_heads, seqlen_q), float32 (float64 for float64 inputs)
        Only with ``return_lse``. Natural log; ``-inf`` for a query that sees no key
        (its output row is 0), or ``sinks[h]`` when sinks are given.

    Raises
    ------
    AttentionError (ValueError)
        Shapes, options or optional inputs that do not fit; the message names the argument.
    TypeError
        Unsupported or mixed dtypes.
    BackendUnavailable
        ``backend`` cannot serve the call (the message says why).

    Notes
    -----
    Order of operations (as FlashAttention-2): scale, score_mod, softcap, ALiBi and bias,
    masking (causal, window, mask, mask_mod, key padding).

    With seqlen_q = 2 and seqlen_k = 5, ``causal=True`` (bottom-right) gives::

        1 1 1 1 0
        1 1 1 1 1

    and ``causal="top_left"`` gives::

        1 0 0 0 0
        1 1 0 0 0

    ``kv_lens`` alone is key padding only: causal masks, windows and ALiBi distances stay
    aligned to the padded shapes (``off = seqlen_k - seqlen_q``), not to ``kv_lens[b]``.
    To align them to each row's real lengths (as FlashAttention does for padded batches),
    pass ``q_lens`` too (``np.full(batch, seqlen_q)`` when no query is padded), or use
    :func:`attention_varlen` on the unpadded rows.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 8, 16), dtype=np.float32)
    >>> k = rng.standard_normal((1, 6, 2, 16), dtype=np.float32)
    >>> v = rng.standard_normal((1, 6, 2, 16), dtype=np.float32)
    >>> out, lse = numba_attn.attention(q, k, v, causal=True, return_lse=True)
    >>> out.shape, lse.shape
    ((1, 4, 8, 16), (1, 8, 4))

    The last two queries alone, against all keys, with their positions kept:

    >>> tail = numba_attn.attention(q[:, 2:], k, v, causal=True, q_offset=2 + 6 - 4)
    >>> bool(np.allclose(tail, out[:, 2:], atol=1e-6))
    True

    A T5-style relative-position bias per head, read from a table passed as an argument:

    >>> table = rng.standard_normal((8, 11))            # (heads, distances -5 .. 5)
    >>> def rel_bias(score, b, h, i, j, table):
    ...     return score + table[h, min(max(j - i, -5), 5) + 5]
    >>> o = numba_attn.attention(q, k, v, score_mod=rel_bias, score_mod_args=(table,))
    >>> from numba_attn import reference
    >>> ref = reference.attention(q, k, v, score_mod=rel_bias, score_mod_args=(table,))
    >>> bool(np.allclose(o, ref, atol=1e-5))
    True
    """
    if wants_grad(q, k, v, bias, sinks):  # torch tensors requiring grad: a grad_fn
        return autograd.attention(
            q, k, v, causal=causal, window=window, scale=scale, softcap=softcap,
            alibi_slopes=alibi_slopes, bias=bias, mask=mask, kv_lens=kv_lens, q_lens=q_lens,
            sinks=sinks, return_lse=return_lse, out=out, dropout_p=dropout_p, seed=seed,
            score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
            mask_mod_args=mask_mod_args, block_mask=block_mask, backend=backend,
            q_offset=q_offset, score_mod_grad=score_mod_grad)
    dt, cdt, device = canon_qkv(q, k, v, 4, "(batch, seqlen_q, num_heads, head_dim)",
                                "(batch, seqlen_k, num_kv_heads, head_dim)")
    return_lse = check_flag("return_lse", return_lse)
    dropout = check_dropout(dropout_p, seed)
    bsz, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    dp.same([("q.shape[0]", bsz), ("k.shape[0]", k.shape[0]), ("v.shape[0]", v.shape[0])],
            "batch sizes")
    dp.same([("k.shape[1]", sk), ("v.shape[1]", v.shape[1])], "seqlen_k of k and v")
    dp.same([("k.shape[2]", hkv), ("v.shape[2]", v.shape[2])], "num_kv_heads of k and v")
    dp.same([("q.shape[3]", d), ("k.shape[3]", k.shape[3])], "head_dim of q and k")
    dv = v.shape[3]
    out_ref, out = out, check_out(out, (bsz, sq, h, dv), dt)
    rows, kl, ql = batched_rows(bsz, sq, sk, kv_lens, q_lens, q_offset, device)
    if device != "cpu":
        from .cuda import dispatch_cuda  # device arrays stay on the device

        qp, kp, vp = dispatch_cuda.pack(q, k, v, cdt)
    else:
        qp = dp.host("q", q, cdt).reshape(bsz * sq, h, d)
        kp = dp.host("k", k, cdt).reshape(bsz * sk, hkv, d)
        vp = dp.host("v", v, cdt).reshape(bsz * sk, hkv, dv)
    p = build_problem(
        q=qp, k=kp, v=vp, rows=rows, block_table=np.zeros((bsz, 1), np.int32),
        block_size=dp.CONTIGUOUS_BLOCK, max_seqlen_q=sq, max_seqlen_k=sk, batch=bsz,
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks,
        has_kv_lens=kl is not None or ql is not None, out_dtype=dt, device=device,
        score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
        mask_mod_args=mask_mod_args, block_mask=block_mask)
    set_dropout(p, dropout)
    o, lse = run_and_finish(p, backend, out, (bsz, sq, h, dv))
    if ql is not None and (ql < sq).any():  # padded query rows: out 0, lse -inf
        pad = np.arange(sq)[None, :] >= ql[:, None]
        o[pad] = 0
        lse.reshape(bsz, sq, h)[pad] = -np.inf
    if out is not None:
        o = out_ref
    if not return_lse:
        return like(q, o)
    return like(q, o), like(q, _lse_bhs(lse, bsz, sq, h))


def batched_rows(bsz, sq, sk, kv_lens, q_lens, q_offset, device):
    """The Problem's rows table of a batched (B, S, H, D) call, checked: (rows, kv_lens,
    q_lens), the lengths as int64 vectors or None. The forward and the backward build it
    here, so their alignment rules cannot differ."""
    kl = ql = None
    if kv_lens is not None:
        kl = dp.check_int_vector("kv_lens", kv_lens, bsz, 0, sk)
    if q_lens is not None:
        ql = dp.check_int_vector("q_lens", q_lens, bsz, 0, sq)
        if device != "cpu":
            raise AttentionError("q_lens: supported for host arrays only (for now); pack the "
                                 "rows and use attention_varlen on the device")
    rows = np.zeros((bsz, 5), np.int64)
    rows[:, 0] = np.arange(bsz) * sq
    rows[:, 1] = sq if ql is None else ql
    rows[:, 2] = np.arange(bsz) * sk
    rows[:, 3] = sk if kl is None else kl
    if q_offset is not None:  # chunked calls: query i sits at key position i + q_offset
        rows[:, 4] = check_offset("q_offset", q_offset)
    else:
        rows[:, 4] = sk - sq if ql is None else rows[:, 3] - ql
    return rows, kl, ql


def check_offset(name, x):
    """An int alignment offset (no bool, no float), bounded so position arithmetic is exact."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int (key position of query 0), got {x!r}")
    if abs(int(x)) > _MAX_OFFSET:
        raise AttentionError(f"{name}: |{name}| must be <= 2**40, got {x}")
    return int(x)


_MAX_OFFSET = 1 << 40


def _lse_bhs(lse, bsz, sq, h):
    if hasattr(lse, "copy_to_host") or not isinstance(lse, np.ndarray):
        from .cuda import dispatch_cuda

        return dispatch_cuda.lse_bhs(lse, bsz, sq, h)
    return np.ascontiguousarray(lse.reshape(bsz, sq, h).transpose(0, 2, 1))


@lay.entry("q", "k", "v", "out")
def attention_varlen(q: Array, k: Array, v: Array, cu_seqlens_q: Array,
                     cu_seqlens_k: Array, *, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, causal: bool | str = False,
                     window: tuple[int, int] = (-1, -1), scale: float | None = None,
                     softcap: float = 0.0, alibi_slopes: Array | None = None,
                     bias: Array | None = None, mask: Array | None = None,
                     kv_lens: Array | None = None, sinks: Array | None = None,
                     return_lse: bool = False, out: Array | None = None,
                     dropout_p: float = 0.0, seed: int | None = None,
                     score_mod: ScoreMod | None = None, score_mod_args: tuple = (),
                     mask_mod: MaskMod | None = None, mask_mod_args: tuple = (),
                     block_mask: BlockMask | None = None,
                     backend: str = "auto", score_mod_grad=None,
                     layout: str = "bshd") -> Array | tuple[Array, Array]:
    """Attention over packed variable-length rows (no padding), FlashAttention's varlen form.

    Parameters
    ----------
    q : array (total_q, num_heads, head_dim)
    k : array (total_k, num_kv_heads, head_dim)
    v : array (total_k, num_kv_heads, head_dim_v)
    cu_seqlens_q, cu_seqlens_k : int arrays (batch + 1,)
        Row offsets: row ``b`` owns ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` and likewise
        keys. Start at 0, non-decreasing, end at total_q / total_k. Empty rows are allowed.
    max_seqlen_q, max_seqlen_k : int, optional
        Longest row (computed when omitted); must not be smaller than the real maximum.
    bias, mask : broadcastable to (batch, num_heads, max_seqlen_q, max_seqlen_k), optional
        Indexed by in-row positions.
    kv_lens : int array (batch,), optional
        Further limits row ``b`` to its first ``kv_lens[b]`` keys.
    causal, window, scale, softcap, alibi_slopes, sinks, backend
        As in :func:`attention`; alignment is per row (``len_k[b] - len_q[b]``).
    score_mod, score_mod_args, mask_mod, mask_mod_args, block_mask, score_mod_grad
        As in :func:`attention`; ``b`` is the segment, ``q_idx`` / ``kv_idx`` positions
        within it (a block mask covers max_seqlen_q x max_seqlen_k).
    return_lse : bool, default False
        Also return lse of shape (num_heads, total_q).
    out : ndarray (total_q, num_heads, head_dim_v), optional
    dropout_p, seed : float, int, optional
        As :func:`attention`; ``b`` of the keep mask is the row (segment) index.
    layout : {"bshd", "bhsd"}, default "bshd"
        "bhsd": q, k, v and out= are (heads, total, dim) and out comes back so too (a
        transposed view).

    Returns
    -------
    out : array (total_q, num_heads, head_dim_v); lse : array (num_heads, total_q)

    Raises
    ------
    AttentionError, TypeError, BackendUnavailable
        As :func:`attention`; also for cu_seqlens that are not monotone, do not start at 0
        or do not end at the totals.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((5, 4, 8), dtype=np.float32)   # rows of 2 and 3 queries
    >>> kv = rng.standard_normal((7, 4, 8), dtype=np.float32)  # rows of 3 and 4 keys
    >>> cu_q = np.array([0, 2, 5], np.int32); cu_k = np.array([0, 3, 7], np.int32)
    >>> numba_attn.attention_varlen(q, kv, kv, cu_q, cu_k, causal=True).shape
    (5, 4, 8)
    """
    if wants_grad(q, k, v, bias, sinks):  # torch tensors requiring grad: a grad_fn
        return autograd.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, causal=causal, window=window, scale=scale,
            softcap=softcap, alibi_slopes=alibi_slopes, bias=bias, mask=mask,
            kv_lens=kv_lens, sinks=sinks, return_lse=return_lse, out=out, dropout_p=dropout_p,
            seed=seed, score_mod=score_mod, score_mod_args=score_mod_args, mask_mod=mask_mod,
            mask_mod_args=mask_mod_args, block_mask=block_mask, backend=backend,
            score_mod_grad=score_mod_grad)
    dt, cdt, device = canon_qkv(q, k, v, 3, "(total_q, num_heads, head_dim)",
                                "(total_k, num_kv_heads, head_dim)")
    return_lse = check_flag("return_lse", return_lse)
    dropout = check_dropout(dropout_p, seed)
    tq, h, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    dp.same([("k.shape[0]", tk), ("v.shape[0]", v.shape[0])], "total_k of k and v")
    dp.same([("k.shape[1]", hkv), ("v.shape[1]", v.shape[1])], "num_kv_heads of k and v")
    dp.same([("q.shape[2]", d), ("k.shape[2]", k.shape[2])], "head_dim of q and k")
    dv = v.shape[2]
    cq = _check_cu("cu_seqlens_q", cu_seqlens_q, tq)
    ck = _check_cu("cu_seqlens_k", cu_seqlens_k, tk)
    if len(cq) != len(ck):
        raise AttentionError(f"cu_seqlens_q and cu_seqlens_k: lengths differ ({len(cq)} vs "
                             f"{len(ck)}); both must be batch + 1")
    bsz = len(cq) - 1
    lq, lk = np.diff(cq), np.diff(ck)
    mq = _check_max("max_seqlen_q", max_seqlen_q, lq)
    mk = _check_max("max_seqlen_k", max_seqlen_k, lk)
    out_ref, out = out, check_out(out, (tq, h, dv), dt)
    rows = np.zeros((bsz, 5), np.int64)
    rows[:, 0] = cq[:-1]
    rows[:, 1] = lq
    rows[:, 2] = ck[:-1]
    rows[:, 3] = lk
    rows[:, 4] = lk - lq
    kl = None
    if kv_lens is not None:
        kl = dp.check_int_vector("kv_lens", kv_lens, bsz, 0, int(lk.max(initial=0)))
        rows[:, 3] = np.minimum(lk, kl)
    if device != "cpu":
        from .cuda import dispatch_cuda

        qp, kp, vp = dispatch_cuda.pack(q, k, v, cdt)
    else:
        qp, kp, vp = (dp.host(n, x, cdt) for n, x in (("q", q), ("k", k), ("v", v)))
    p = build_problem(
        q=qp, k=kp, v=vp, rows=rows, block_table=np.zeros((bsz, 1), np.int32),
        block_size=dp.CONTIGUOUS_BLOCK, max_seqlen_q=mq, max_seqlen_k=mk, batch=bsz,
        causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=alibi_slopes, bias=bias, mask=mask, sinks=sinks,
        has_kv_lens=kl is not None, out_dtype=dt, device=device, score_mod=score_mod,
        score_mod_args=score_mod_args, mask_mod=mask_mod, mask_mod_args=mask_mod_args,
        block_mask=block_mask)
    set_dropout(p, dropout)
    o, lse = run_and_finish(p, backend, out, (tq, h, dv))
    if out is not None:
        o = out_ref
    if not return_lse:
        return like(q, o)
    if isinstance(lse, np.ndarray):
        return like(q, o), like(q, np.ascontiguousarray(lse.T))
    from .cuda import dispatch_cuda

    return like(q, o), like(q, dispatch_cuda.lse_transpose(lse))


def _check_cu(name, cu, total):
    a = dp.host(name, cu)
    if a.ndim != 1 or a.shape[0] < 1:
        raise AttentionError(f"{name}: expected a 1-D int array of length batch + 1, got "
                             f"shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected int32 offsets, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a[0] != 0 or a[-1] != total:
        raise AttentionError(f"{name}: must start at 0 and end at the total ({total}), got "
                             f"{name}[0] = {a[0]}, {name}[-1] = {a[-1]}")
    if np.any(np.diff(a) < 0):
        i = int(np.argmax(np.diff(a) < 0))
        raise AttentionError(f"{name}: must be non-decreasing, got {name}[{i}] = {a[i]} > "
                             f"{name}[{i + 1}] = {a[i + 1]}")
    return a


def _check_max(name, given, lens):
    real = int(lens.max(initial=0))
    if given is None:
        return real
    given = check_int(name, given, lo=0)
    if given < real:
        raise AttentionError(f"{name}: {given} is smaller than the longest row ({real})")
    return int(given)


def merge_states(out_a: Array, lse_a: Array, out_b: Array,
                 lse_b: Array) -> tuple[Array, Array]:
    """Merge two partial attention results computed over disjoint key sets.

    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse)
    out_b``; a part with ``lse = -inf`` (no visible key) is the identity, two such parts
    give ``out = 0, lse = -inf``.

    Parameters
    ----------
    out_a, out_b : array (..., seqlen, num_heads, head_dim_v)
        As :func:`attention` (batch, seqlen_q, H, Dv) or :func:`attention_varlen` (T, H, Dv).
    lse_a, lse_b : array (..., num_heads, seqlen)
        The matching log-sum-exp arrays, natural log.

    Returns
    -------
    out : array like out_a (dtype of out_a); lse : array like lse_a

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 3, 2, 8)); k = rng.standard_normal((1, 10, 2, 8))
    >>> oa, la = numba_attn.attention(q, k[:, :4], k[:, :4], return_lse=True)
    >>> ob, lb = numba_attn.attention(q, k[:, 4:], k[:, 4:], return_lse=True)
    >>> o, l = numba_attn.merge_states(oa, la, ob, lb)
    >>> bool(np.allclose(o, numba_attn.attention(q, k, k)))
    True
    """
    for name, x in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not hasattr(x, "shape"):
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    if out_a.ndim < 3:
        raise AttentionError(f"out_a: expected (..., seqlen, num_heads, head_dim_v), got "
                             f"shape {out_a.shape}")
    dt = dp.check_float("out_a", out_a)
    if out_b.shape != out_a.shape:
        raise AttentionError(f"out_b: shape {out_b.shape} differs from out_a's {out_a.shape}")
    oshape = tuple(out_a.shape)  # (the CUDA simulator's shape refuses negative indices)
    want = oshape[:-3] + (oshape[-2], oshape[-3])
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(x.shape) != want:
            raise AttentionError(f"{name}: expected shape (..., num_heads, seqlen) = {want}, "
                                 f"got {tuple(x.shape)}")
    if dp.array_device(out_a) != "cpu":
        from .cuda import dispatch_cuda

        return dispatch_cuda.merge_states(out_a, lse_a, out_b, lse_b)
    from .cpu.forward import merge_states as kernel

    cdt = dp.compute_dtype(dt)
    s, h, dv = out_a.shape[-3:]
    lead = int(np.prod(out_a.shape[:-3], dtype=np.int64))
    oa = dp.host("out_a", out_a, cdt).reshape(lead, s, h, dv)
    ob = dp.host("out_b", out_b, cdt).reshape(lead, s, h, dv)
    la = dp.host("lse_a", lse_a, cdt).reshape(lead, h, s)
    lb = dp.host("lse_b", lse_b, cdt).reshape(lead, h, s)
    o = np.empty_like(oa)
    lse = np.empty_like(la)
    with parallel_guard():
        kernel(oa, la, ob, lb, o, lse)
    return (like(out_a, o.reshape(oshape).astype(dt, copy=False)),
            like(out_a, lse.reshape(want)))


autograd.register("attention", forward=attention)
autograd.register("attention_varlen", forward=attention_varlen)
