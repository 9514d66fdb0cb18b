"""Rotary position embeddings (RoPE): cos/sin tables and their application, CPU and CUDA.

Tables follow FlashAttention's convention: ``cos``, ``sin`` of shape
``(max_position, rotary_dim // 2)``, row ``p`` holding the angles ``p * inv_freq``.
Two channel layouts are supported: GPT-NeoX / Llama "half-split" (pairs ``(c, c + R/2)``,
the default) and GPT-J "interleaved" (pairs ``(2c, 2c + 1)``). When ``rotary_dim`` is
smaller than ``head_dim`` the remaining channels pass through unchanged (partial rotary).
"""
from __future__ import annotations


import numpy as np
from numpy.typing import DTypeLike

from . import dispatch as dp
from .interop import Array, to_numpy
from .config import AttentionError, _is_int, check_flag, check_int, check_real
from .validate import kernel_input, kernel_output


__all__ = ["apply_rotary", "apply_rotary_backward", "rotary_cos_sin"]


def rotary_cos_sin(max_position: int, rotary_dim: int, *, base: float = 10000.0,
                   scaling: dict | None = None, dtype: DTypeLike = np.float32,
                   seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cos/sin tables of rotary embeddings, Hugging Face ``rope_scaling`` semantics.

    Parameters
    ----------
    max_position : int
        Number of positions (table rows), > 0.
    rotary_dim : int
        Rotated channels per head; even, > 0 and at most the head dim it is applied to.
    base : float, default 10000.0
        ``inv_freq[i] = base ** (-2 i / rotary_dim)``; Llama 3 uses 500000.
    scaling : dict or None, default None
        ``None`` (or ``{"rope_type": "default"}``): plain RoPE.
        ``{"rope_type": "linear", "factor": f}`` (position interpolation): frequencies / f.
        ``{"rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor":
        hi, "original_max_position_embeddings": n}``: wavelengths above ``n / lo`` are
        divided by ``f``, those below ``n / hi`` kept, a smooth blend in between.
        ``{"rope_type": "dynamic", "factor": f, "max_position_embeddings": m}`` (NTK):
        the base grows with ``seq_len`` past ``m``.
        ``{"rope_type": "yarn", "factor": f, "original_max_position_embeddings": n,
        "beta_fast"?, "beta_slow"?, "mscale"?, "mscale_all_dim"?, "attention_factor"?,
        "truncate"?}``: YaRN (Qwen3 long context, DeepSeek).
        ``{"rope_type": "longrope", "long_factor": [...], "short_factor": [...],
        "original_max_position_embeddings": n, "factor"? or "max_position_embeddings"?,
        "attention_factor"?}``: LongRoPE (Phi-3 128k); the long factors serve
        ``seq_len > n``.
        The formulas, attention factor included (it multiplies cos and sin), are Hugging
        Face's (``transformers.modeling_rope_utils``); see
        :func:`numba_attn.reference_rope.rope_parameters`. The key ``"type"`` is accepted
        for ``"rope_type"``.
    dtype : numpy dtype, default float32
        Dtype of the tables (computed in float64, then cast).
    seq_len : int, default max_position
        The sequence length the tables serve (Hugging Face's ``max(position_ids) + 1``);
        matters for ``dynamic`` and ``longrope`` only.

    Returns
    -------
    cos, sin : ndarray (max_position, rotary_dim // 2)

    Raises
    ------
    AttentionError (ValueError)
        Non-positive sizes, odd ``rotary_dim``, ``base <= 1``, an unknown scaling type,
        missing scaling keys, values out of range.
    TypeError
        Strings or other non-numbers where numbers belong (the message names the key).

    Examples
    --------
    >>> import numba_attn
    >>> cos, sin = numba_attn.rotary_cos_sin(2048, 64, base=500000.0, scaling={
    ...     "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    ...     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    >>> cos.shape, cos.dtype
    ((2048, 32), dtype('float32'))
    """
    from .reference_rope import rotary_cos_sin as table

    max_position = _positive_int("max_position", max_position)
    rotary_dim = _positive_int("rotary_dim", rotary_dim)
    if rotary_dim % 2:
        raise AttentionError(f"rotary_dim: must be even (channels rotate in pairs), got "
                             f"{rotary_dim}")
    base = check_real("base", base)
    if base <= 1.0:
        raise AttentionError(f"base: must be finite and > 1, got {base!r}")
    scaling = check_scaling(scaling, rotary_dim)
    seq_len = max_position if seq_len is None else _positive_int("seq_len", seq_len)
    cos, sin = table(max_position, rotary_dim, base, scaling, seq_len)
    return cos.astype(dtype), sin.astype(dtype)


def _positive_int(name, x):
    if not _is_int(x) or int(x) <= 0:
        raise AttentionError(f"{name}: expected a positive int, got {x!r}")
    return check_int(name, x, lo=1)


_SCALING_KEYS = {  # required keys; "factor" of yarn/longrope may come from the lengths
    "default": (), "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "dynamic": ("factor",),
    "yarn": ("original_max_position_embeddings",),
    "longrope": ("long_factor", "short_factor", "original_max_position_embeddings"),
}
_SCALING_REALS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                  "mscale", "mscale_all_dim", "attention_factor",
                  "original_max_position_embeddings", "max_position_embeddings")
LENGTH_DEPENDENT = ("dynamic", "longrope")  # tables depend on the sequence length served


def scaling_kind(scaling):
    """``"default"``, ``"linear"``, ... of a (checked) scaling dict or None."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type")) or "default"


def check_scaling(scaling, rotary_dim):
    """Validate a Hugging Face ``rope_scaling`` dict for ``rotary_dim``; returns a plain
    dict (or None). Every error names the offending key."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise AttentionError(f"scaling: expected None or a dict like {{'rope_type': "
                             f"'linear', 'factor': 2.0}}, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        kind = "default"
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's early name of longrope
    if kind not in _SCALING_KEYS:
        raise AttentionError(f"scaling: rope_type must be one of {sorted(_SCALING_KEYS)}, "
                             f"got {kind!r}")
    missing = [key for key in _SCALING_KEYS[kind] if key not in scaling]
    if kind in ("yarn", "longrope") and scaling.get("factor") is None and (
            scaling.get("max_position_embeddings") is None):
        missing.append("factor (or max_position_embeddings)")
    if kind == "dynamic" and not (scaling.get("max_position_embeddings") or
                                  scaling.get("original_max_position_embeddings")):
        missing.append("max_position_embeddings")
    if missing:
        raise AttentionError(f"scaling: {kind!r} scaling needs keys {missing}")
    for key in _SCALING_REALS:
        if scaling.get(key) is None:
            continue
        val = check_real(f"scaling[{key!r}]", scaling[key])
        lo_ok = val >= 0 if key in ("mscale", "mscale_all_dim") else val > 0
        if not lo_ok:
            raise AttentionError(f"scaling[{key!r}]: must be > 0, got {val!r}")
    if kind == "llama3" and float(scaling["high_freq_factor"]) <= float(
            scaling["low_freq_factor"]):
        raise AttentionError("scaling: high_freq_factor must exceed low_freq_factor")
    if kind == "dynamic" and rotary_dim <= 2:
        raise AttentionError("scaling: 'dynamic' needs rotary_dim > 2 (its exponent is "
                             "d / (d - 2))")
    if kind == "longrope":
        for key in ("long_factor", "short_factor"):
            try:
                ext = np.asarray(scaling[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise TypeError(f"scaling[{key!r}]: expected a list of "
                                f"{rotary_dim // 2} floats") from None
            if ext.shape != (rotary_dim // 2,) or not np.all(np.isfinite(ext)) or (
                    ext <= 0).any():
                raise AttentionError(f"scaling[{key!r}]: expected {rotary_dim // 2} finite "
                                     f"positive floats (rotary_dim // 2), got shape "
                                     f"{ext.shape}")
    if "truncate" in scaling:
        check_flag("scaling['truncate']", scaling["truncate"])
    return dict(scaling, rope_type=kind)


def check_tables(cos, sin, head_dim):
    """Validate FlashAttention-style cos/sin tables for heads of ``head_dim`` (host or
    device arrays)."""
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        dp.check_rank(name, t, 2, "(max_position, rotary_dim // 2)")
        dp.check_float(name, t)
    if tuple(cos.shape) != tuple(sin.shape):
        raise AttentionError(f"rotary_cos and rotary_sin: shapes differ ({tuple(cos.shape)} "
                             f"vs {tuple(sin.shape)})")
    if cos.shape[0] < 1 or cos.shape[1] < 1:
        raise AttentionError(f"rotary_cos: empty table of shape {tuple(cos.shape)}")
    if 2 * cos.shape[1] > head_dim:
        raise AttentionError(f"rotary_cos: rotary_dim = 2 * cos.shape[1] = {2 * cos.shape[1]}"
                             f" exceeds head_dim = {head_dim}")


def rotate(x, cos, sin, pos, interleaved, out=None):
    """Rotate canonical x (T, H, D) (compute dtype, C-contiguous) at int64 ``pos`` (T,).

    Positions must already be checked against the table. The backend where x lives runs
    it (``dispatch.elementwise``: host arrays the numba CPU kernel, device arrays the CUDA
    one). Returns ``out`` (a new array by default; ``x`` itself may be passed to rotate in
    place).
    """
    return dp.elementwise("rotary", x).rotary(x, cos, sin, pos, interleaved, out)


def apply_rotary(x: Array, cos: Array, sin: Array, *, interleaved: bool = False,
                 positions: int | Array | None = None) -> Array:
    """Apply rotary position embeddings to a (..., seqlen, heads, head_dim) array.

    Each channel pair ``(a, b)`` of token ``t`` becomes ``(a cos - b sin, b cos + a sin)``
    with the angles of row ``positions[t]`` of the tables. Channels from ``rotary_dim =
    2 * cos.shape[1]`` on pass through (partial rotary, e.g. GPT-NeoX, Phi).

    Parameters
    ----------
    x : array (..., seqlen, num_heads, head_dim)
        BSHD as :func:`numba_attn.attention` (or packed (total, heads, head_dim)); float16,
        bfloat16, float32 or float64; numpy (CPU kernel) or a CUDA device array (CUDA kernel).
    cos, sin : array (max_position, rotary_dim // 2)
        As :func:`rotary_cos_sin` returns; ``rotary_dim <= head_dim``.
    interleaved : bool, default False
        False: GPT-NeoX / Llama half-split pairs ``(c, c + rotary_dim/2)``.
        True: GPT-J interleaved pairs ``(2c, 2c + 1)``.
    positions : None, int or int array broadcastable to x.shape[:-2], default None
        Position of each token. None: ``0 .. seqlen-1`` along the seqlen axis; an int
        ``p0``: ``p0 .. p0 + seqlen - 1``; an array: explicit positions (for per-row
        offsets in a batch use ``offsets[:, None] + np.arange(seqlen)``).
        Every position must lie in ``[0, max_position)``.

    Returns
    -------
    array like x (same shape, dtype and device); computed in float32 (float64 for float64).

    Raises
    ------
    AttentionError (ValueError)
        Bad ranks or shapes, ``rotary_dim > head_dim``, positions out of the table.
    TypeError
        Non-float x or tables, non-integer positions.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> cos, sin = numba_attn.rotary_cos_sin(16, 8)
    >>> x = np.ones((1, 3, 2, 8), np.float32)           # (batch, seqlen, heads, head_dim)
    >>> y = numba_attn.apply_rotary(x, cos, sin)
    >>> bool(np.allclose(y[0, 0], x[0, 0]))              # position 0 is the identity
    True
    >>> bool(np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1)))
    True
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x: expected an array (..., seqlen, heads, head_dim), got "
                        f"{type(x).__name__}")
    shape = tuple(x.shape)
    if len(shape) < 3:
        raise AttentionError(f"x: expected at least 3-D (..., seqlen, heads, head_dim), got "
                             f"shape {shape}")
    dt = dp.check_float("x", x)
    cdt = dp.compute_dtype(dt)
    check_tables(cos, sin, shape[-1])
    interleaved = check_flag("interleaved", interleaved)
    tokens = shape[:-2]
    pos = token_positions(positions, tokens, cos.shape[0])
    n_t = int(np.prod(tokens, dtype=np.int64))
    h, d = shape[-2], shape[-1]
    x3 = kernel_input("x", x, cdt).reshape(n_t, h, d)
    y = rotate(x3, cos, sin, pos, interleaved)
    return kernel_output(x, y.reshape(shape), dt)


def apply_rotary_backward(dout: Array = None, cos: Array = None, sin: Array = None, *,
                          interleaved: bool = False, positions: int | Array | None = None,
                          dy: Array | None = None) -> Array:
    """Gradient of ``apply_rotary(x, cos, sin, ...)`` with respect to ``x``.

    Each pair is rotated by the transposed rotation, i.e. ``apply_rotary`` with ``-sin``;
    pass-through channels (partial rotary) pass the gradient through unchanged. ``dout``
    (the gradient of the output) was named ``dy`` before 0.3; ``dy=`` still works this
    release, with a DeprecationWarning.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> cos, sin = numba_attn.rotary_cos_sin(16, 8)
    >>> x = np.random.default_rng(0).standard_normal((1, 3, 2, 8))
    >>> y = numba_attn.apply_rotary(x, cos, sin)
    >>> bool(np.allclose(numba_attn.apply_rotary_backward(y, cos, sin), x))  # a rotation
    True
    """
    from .norm import _renamed

    dout = _renamed("apply_rotary_backward", "dy", dy, "dout", dout)
    return apply_rotary(dout, cos, -to_numpy("sin", sin), interleaved=interleaved,
                        positions=positions)


def token_positions(positions, tokens, max_position):
    """int64 (prod(tokens),) positions of each token, checked against the table."""
    seqlen = tokens[-1]
    if positions is None:
        positions = 0
    if np.ndim(positions) == 0 and not isinstance(positions, np.ndarray) or (
            isinstance(positions, np.ndarray) and positions.ndim == 0):
        if not _is_int(positions):
            raise TypeError(f"positions: expected an int or an int array, got {positions!r}")
        p0 = check_int("positions", positions, lo=0, hi=2**62)
        pos = p0 + np.arange(seqlen, dtype=np.int64)
    else:
        p = dp.host_operand("positions", positions, "iu", "an integer array")
        if p.dtype == np.uint64 and p.size and p.max() > 2**62:
            raise AttentionError(f"positions: {int(p.max())} lies outside the rotary table "
                                 f"[0, {max_position})")
        pos = p.astype(np.int64)
    try:
        pos = np.broadcast_to(pos, tokens)
    except ValueError:
        raise AttentionError(f"positions: shape {np.shape(pos)} does not broadcast to the "
                             f"token axes {tokens} of x") from None
    pos = np.ascontiguousarray(pos).reshape(-1)
    if pos.size and (pos.min() < 0 or pos.max() >= max_position):
        bad = int(pos.min()) if pos.min() < 0 else int(pos.max())
        raise AttentionError(f"positions: {bad} lies outside the rotary table "
                             f"[0, {max_position}); build longer tables with rotary_cos_sin")
    return pos
