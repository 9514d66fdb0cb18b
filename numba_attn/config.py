"""AttentionConfig: the one shared, frozen, validated description of an attention call.

Every backend receives the same config; nothing in a kernel reads module globals.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AttentionConfig", "AttentionError", "BackendUnavailable", "normalize_causal",
           "check_int", "check_real", "check_flag"]

INT64_MAX = 2**63 - 1
WINDOW_UNBOUNDED_FROM = 2**62  # a window side this wide sees every key: stored as -1


class AttentionError(ValueError):
    """Base class of numba_attn's argument errors (a ``ValueError``).

    Raised before anything runs or is written; the message names the argument, what came
    and what is allowed.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> q = np.zeros((1, 2, 4, 8), np.float32)
    >>> try:
    ...     numba_attn.attention(q, q, q, window=(-3, 0))
    ... except numba_attn.AttentionError as e:
    ...     print(e)
    window: each side must be >= 0 or -1 (unbounded), got (-3, 0)
    """


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve this call; the message says why.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> q = np.zeros((1, 2, 4, 8), np.float32)
    >>> why = numba_attn.available_backends()["cuda"]
    >>> try:
    ...     numba_attn.attention(q, q, q, backend="cuda")
    ...     served = True
    ... except numba_attn.BackendUnavailable as e:
    ...     served = False
    ...     assert why in str(e)
    >>> served == (why is None)
    True
    """


_CAUSAL_VALUES = {False: "none", None: "none", "none": "none", True: "bottom_right",
                  "bottom_right": "bottom_right", "top_left": "top_left"}


def normalize_causal(causal) -> str:
    """Map the public ``causal`` argument to ``"none"``, ``"bottom_right"`` or ``"top_left"``."""
    try:
        return _CAUSAL_VALUES[causal]
    except (KeyError, TypeError):
        raise AttentionError(
            f"causal: expected False, True, 'bottom_right' or 'top_left', got {causal!r}"
        ) from None


@dataclass(frozen=True)
class AttentionConfig:
    """Validated, immutable description of one attention problem.

    Parameters
    ----------
    num_heads : int
        Query heads.
    num_kv_heads : int, default num_heads
        Key/value heads; must divide ``num_heads`` (GQA), 1 is MQA.
    head_dim : int
        Query/key head dimension.
    head_dim_v : int, default head_dim
        Value head dimension (differs for MLA).
    scale : float, default 1/sqrt(head_dim)
        Multiplier of ``q . k``; finite and > 0.
    causal : {False, True, "bottom_right", "top_left"}, default False
        ``True`` means bottom-right aligned (FlashAttention); stored normalised.
    window : (int, int), default (-1, -1)
        Sliding window ``(left, right)``; -1 means unbounded on that side.
    softcap : float, default 0.0
        ``softcap * tanh(s / softcap)`` when > 0; 0 disables it.
    has_alibi, has_bias, has_mask, has_kv_lens, has_sinks : bool
        Which optional inputs the call carries.

    Raises
    ------
    AttentionError (ValueError)
        Non-positive sizes, ``num_heads % num_kv_heads != 0``, a scale that is not finite
        and > 0, a bad window or causal value, a negative softcap.
    TypeError
        Strings, floats or bools where ints belong (and the like).

    Examples
    --------
    >>> from numba_attn import AttentionConfig
    >>> cfg = AttentionConfig.gqa(32, 8, 128, causal=True, window=(4095, 0))
    >>> cfg.group_size, cfg.causal, round(cfg.scale, 6)
    (4, 'bottom_right', 0.088388)
    >>> AttentionConfig(8, head_dim=64, window=(2**64, 0)).window  # as wide as unbounded
    (-1, 0)
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int = 64
    head_dim_v: int | None = None
    scale: float | None = None
    causal: object = False
    window: tuple = (-1, -1)  # -1 means unbounded on that side
    softcap: float = 0.0  # 0 disables soft-capping
    has_alibi: bool = False
    has_bias: bool = False
    has_mask: bool = False
    has_kv_lens: bool = False
    has_sinks: bool = False
    _validated: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("num_heads", "head_dim"):
            _check_positive_int(name, getattr(self, name))
        if self.num_kv_heads is None:
            set_(self, "num_kv_heads", self.num_heads)
        _check_positive_int("num_kv_heads", self.num_kv_heads)
        if self.head_dim_v is None:
            set_(self, "head_dim_v", self.head_dim)
        _check_positive_int("head_dim_v", self.head_dim_v)
        if self.num_kv_heads > self.num_heads:
            raise AttentionError(
                f"num_kv_heads: must be <= num_heads, got num_kv_heads={self.num_kv_heads} "
                f"> num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise AttentionError(
                f"num_heads % num_kv_heads must be 0, got num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}; choose num_kv_heads among "
                f"{[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}"
            )
        if self.scale is None:
            set_(self, "scale", 1.0 / math.sqrt(self.head_dim))
        scale = check_real("scale", self.scale)
        if scale <= 0.0:
            raise AttentionError(f"scale: must be finite and > 0, got {self.scale!r}")
        set_(self, "scale", scale)
        set_(self, "causal", normalize_causal(self.causal))
        set_(self, "window", _check_window(self.window))
        softcap = check_real("softcap", self.softcap)
        if softcap < 0.0:
            raise AttentionError(
                f"softcap: must be finite and >= 0 (0 disables), got {self.softcap!r}")
        set_(self, "softcap", softcap)
        for name in ("has_alibi", "has_bias", "has_mask", "has_kv_lens", "has_sinks"):
            set_(self, name, check_flag(name, getattr(self, name)))

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def mha(cls, num_heads, head_dim, **kw) -> "AttentionConfig":
        """Multi-head attention: one kv head per query head."""
        return cls(num_heads=num_heads, num_kv_heads=num_heads, head_dim=head_dim, **kw)

    @classmethod
    def gqa(cls, num_heads, num_kv_heads, head_dim, **kw) -> "AttentionConfig":
        """Grouped-query attention: ``num_heads // num_kv_heads`` query heads per kv head."""
        return cls(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, **kw)

    @classmethod
    def mqa(cls, num_heads, head_dim, **kw) -> "AttentionConfig":
        """Multi-query attention: a single kv head shared by all query heads."""
        return cls(num_heads=num_heads, num_kv_heads=1, head_dim=head_dim, **kw)

    # -- derived ------------------------------------------------------------------------
    @property
    def is_mha(self) -> bool:
        """One kv head per query head."""
        return self.num_kv_heads == self.num_heads

    @property
    def is_mqa(self) -> bool:
        """A single kv head shared by several query heads."""
        return self.num_kv_heads == 1 and self.num_heads > 1

    @property
    def is_gqa(self) -> bool:
        """Grouped-query attention: 1 < num_kv_heads < num_heads."""
        return 1 < self.num_kv_heads < self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_causal(self) -> bool:
        """Any causal mask (bottom-right or top-left)."""
        return self.causal != "none"


def _is_int(value):
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (numbers.Integral, np.integer)):
        return True
    return isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu"


def _is_real(value):
    if _is_int(value) or isinstance(value, (np.floating, float)):
        return not isinstance(value, (bool, np.bool_))
    return isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind == "f"


def check_int(name, value, *, lo=None, hi=INT64_MAX, what="an int"):
    """``value`` as a Python int, else an error naming ``name``.

    Accepts Python and numpy integers (and 0-d integer arrays); rejects bools, floats
    (even integral ones), strings and everything else with ``TypeError``, and values
    outside ``[lo, hi]`` with :class:`AttentionError`.

    Examples
    --------
    >>> from numba_attn.config import check_int
    >>> check_int("num_heads", 8, lo=1)
    8
    >>> check_int("num_heads", "eight", lo=1)
    Traceback (most recent call last):
        ...
    TypeError: num_heads: expected an int, got 'eight' (str)
    """
    if not _is_int(value):
        raise TypeError(f"{name}: expected {what}, got {value!r} ({type(value).__name__})")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise AttentionError(f"{name}: must lie in {rng}, got {v}")
    return v


def check_real(name, value, *, finite=True):
    """``value`` as a Python float, else an error naming ``name``.

    Accepts Python and numpy integers and floats (and 0-d arrays of them); rejects bools,
    strings, complex numbers and everything else with ``TypeError``; with ``finite``,
    NaN and infinities with :class:`AttentionError`.

    Examples
    --------
    >>> from numba_attn.config import check_real
    >>> check_real("softcap", 30)
    30.0
    >>> check_real("base", "abc")
    Traceback (most recent call last):
        ...
    TypeError: base: expected a real number, got 'abc' (str)
    """
    if not _is_real(value):
        raise TypeError(f"{name}: expected a real number, got {value!r} "
                        f"({type(value).__name__})")
    v = float(value)
    if finite and not math.isfinite(v):
        raise AttentionError(f"{name}: must be finite, got {value!r}")
    return v


def check_flag(name, value):
    """``value`` as a bool: Python/numpy bools only (0 and 1 included), else ``TypeError``.

    Examples
    --------
    >>> from numba_attn.config import check_flag
    >>> check_flag("causal", True)
    True
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if _is_int(value) and int(value) in (0, 1):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {value!r} ({type(value).__name__})")


def _check_positive_int(name, value):
    if not _is_int(value):
        raise AttentionError(f"{name}: expected a positive int, got {value!r}")
    if int(value) <= 0:
        raise AttentionError(f"{name}: must be > 0, got {value!r}")


def _check_window(window):
    """(left, right) of Python ints; sides of 2**62 or more see every key and become -1."""
    bad = AttentionError(
        f"window: expected a pair (left, right) of ints, -1 meaning unbounded, got {window!r}")
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise bad
    if not all(_is_int(side) for side in window):
        raise bad
    left, right = (int(side) for side in window)
    if left < -1 or right < -1:
        raise AttentionError(
            f"window: each side must be >= 0 or -1 (unbounded), got {window!r}"
        )
    return tuple(-1 if side >= WINDOW_UNBOUNDED_FROM else side for side in (left, right))
