"""Attention variants in plain Python: ``score_mod`` / ``mask_mod`` compiled into the kernels.

A ``score_mod(score, b, h, q_idx, kv_idx, *score_mod_args) -> float`` rewrites each scaled
score; a ``mask_mod(b, h, q_idx, kv_idx, *mask_mod_args) -> bool`` says which keys a query
may attend (True = may attend). Both are plain Python (or already ``numba.njit``):
numba_attn compiles them with Numba and the fused CPU forward calls them per score, inlined
by LLVM (no Python, no indirect call); on the CUDA backend they become inlined device
functions of the forward kernel. ``b`` is the batch row (the segment for varlen),
``h`` the query head, ``q_idx`` the query's index within its row and ``kv_idx`` the key's
position within the row (for a cache: the cache position). Arrays and scalars reach the
functions through the ``*_mod_args`` tuples, passed to the kernel as arguments: changing a
table's contents needs no recompile.

Order of operations: ``s = scale * q . k``; ``s = score_mod(s, ...)``; then the built-in
steps as before (softcap, ALiBi, bias, masks); ``mask_mod`` masks together with ``causal``,
``window``, ``mask`` and key padding (a key is visible when all of them allow it). The
functions may be called on positions that another mask hides; their value there is
discarded. Indices passed are always inside the row (``q_idx < seqlen_q``, ``kv_idx <``
the row's key count).

:func:`create_block_mask` evaluates a mask_mod once, in parallel, into per-block flags
(empty / partial / full) that ``attention(..., block_mask=...)`` reuses: the kernel skips
strip-tiles whose blocks are all empty and calls ``mask_mod`` only where a block is partial.
Without a block mask nothing is skipped: ``mask_mod`` runs on every score the built-in
options leave visible (one call per score, about the cost of a ``mask=`` array lookup).

Examples
--------
Each is a few lines of plain Python; the arrays they read are passed as arguments.

>>> import math, numba, numpy as np, numba_attn
>>> from numba_attn import reference
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((2, 48, 4, 16), dtype=np.float32) for _ in range(3))

T5 relative-position buckets (the bucket helper is ``numba.njit`` so the mod can call it):

>>> @numba.njit
... def bucket(rel, n, max_dist):                  # T5, bidirectional
...     half = n // 2
...     ret = half if rel > 0 else 0
...     r = abs(rel)
...     exact = half // 2
...     if r < exact:
...         return ret + r
...     big = exact + int(math.log(r / exact) / math.log(max_dist / exact) * (half - exact))
...     return ret + min(big, half - 1)
>>> def t5(score, b, h, i, j, table):
...     return score + table[h, bucket(j - i, table.shape[1], 128)]
>>> table = rng.standard_normal((4, 32))           # (heads, buckets), learned
>>> o = numba_attn.attention(q, k, v, score_mod=t5, score_mod_args=(table,))

Document masking for packed sequences (one id per token), with block-sparse skipping:

>>> doc = np.repeat(np.arange(4), 12)[None].repeat(2, axis=0)   # (batch, seqlen)
>>> def same_doc_causal(b, h, i, j, doc):
...     return doc[b, i] == doc[b, j] and j <= i
>>> bm = numba_attn.create_block_mask(same_doc_causal, 2, 1, 48, 48, mask_mod_args=(doc,))
>>> o = numba_attn.attention(q, k, v, block_mask=bm)
>>> ref = reference.attention(q, k, v, mask_mod=same_doc_causal, mask_mod_args=(doc,))
>>> bool(np.allclose(o, ref, atol=1e-5))
True

Prefix-LM (bidirectional over each row's prefix, causal after it):

>>> def prefix_lm(b, h, i, j, prefix_len):
...     return j <= i or j < prefix_len[b]
>>> o = numba_attn.attention(q, k, v, mask_mod=prefix_lm,
...                          mask_mod_args=(np.array([10, 3]),))

Sliding window plus global tokens (Longformer):

>>> def longformer(b, h, i, j, w, n_global):
...     return abs(i - j) <= w or i < n_global or j < n_global
>>> o = numba_attn.attention(q, k, v, mask_mod=longformer, mask_mod_args=(8, 2))
>>> o.shape
(2, 48, 4, 16)

Compile cost: each distinct function (and argument types) compiles its own specialisation
of the fused forward once per machine, a few seconds to tens of seconds: the variant is
written to a cache directory (a generated ``.py`` file per mod, Numba's disk cache beside
it; see ``numba_attn._modcache``), keyed by the mod's code, constants, closure values and
the globals it reads, so a second process loads it in well under a second, and an edited
mod (or a helper or constant it uses) compiles anew, never a stale hit. A mod reading a
global the key cannot vouch for (an arbitrary object) compiles once per process instead.
A second call with the same functions and argument types compiles nothing.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Callable

import numba
import numpy as np
from numba import prange
from numba.core import types
from numba.core.errors import NumbaError

from ._modcache import ModKernel
from .config import AttentionError

__all__ = ["BlockMask", "create_block_mask", "ModError"]

ScoreMod = Callable[..., float]  # (score, b, h, q_idx, kv_idx, *score_mod_args) -> float
MaskMod = Callable[..., bool]  # (b, h, q_idx, kv_idx, *mask_mod_args) -> bool


class ModError(AttentionError, TypeError):
    """A score_mod / mask_mod that cannot serve: wrong arity, does not compile for the
    kernel with the argument types it is given, or returns the wrong type (also an
    :class:`AttentionError` and a ``TypeError``). Raised before any kernel runs.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> q = np.zeros((1, 2, 4, 8), np.float32)
    >>> def two_args(score, b):
    ...     return score
    >>> try:
    ...     numba_attn.attention(q, q, q, score_mod=two_args)
    ... except numba_attn.ModError as e:
    ...     print(str(e).split(" (")[0].split(":")[0], isinstance(e, TypeError))
    score_mod True
    """


_WRAPPED = weakref.WeakKeyDictionary()  # plain Python function -> its njit dispatcher


def _dispatcher(kind, fn):
    if isinstance(fn, numba.core.registry.CPUDispatcher):
        return fn
    if not inspect.isfunction(fn):
        raise ModError(f"{kind}: expected a Python function or a numba.njit function, got "
                       f"{type(fn).__name__}")
    d = _WRAPPED.get(fn)
    if d is None:
        d = numba.njit(error_model="numpy")(fn)
        _WRAPPED[fn] = d
    return d


def _arg_types(kind, args):
    if args is None:
        return (), ()
    if not isinstance(args, (tuple, list)):
        raise ModError(f"{kind}_args: expected a tuple of arrays / scalars, got "
                       f"{type(args).__name__}")
    args = tuple(args)
    tys = []
    for i, a in enumerate(args):
        if hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray):
            raise ModError(f"{kind}_args[{i}]: a device array; the CPU kernels take numpy "
                           "arrays")
        try:
            tys.append(numba.typeof(a))
        except ValueError:
            raise ModError(f"{kind}_args[{i}]: {type(a).__name__} cannot be passed to a Numba "
                           "kernel; pass numpy arrays, numbers or tuples of them") from None
    return args, tuple(tys)


def _compile(kind, fn, lead, args):
    """The njit dispatcher of ``fn`` compiled for (lead types + types of args); returns
    (dispatcher, args, return type). Raises ModError naming the mod and the types."""
    disp = _dispatcher(kind, fn)
    args, tys = _arg_types(kind, args)
    argtypes = tuple(lead) + tys
    names = ("score, b, h, q_idx, kv_idx" if kind == "score_mod" else "b, h, q_idx, kv_idx")
    name = getattr(disp.py_func, "__qualname__", repr(disp.py_func))
    try:
        inspect.signature(disp.py_func).bind(*range(len(argtypes)))
    except TypeError:
        raise ModError(f"{kind}: {name}{inspect.signature(disp.py_func)} cannot take "
                       f"{len(argtypes)} positional arguments ({names} and "
                       f"{len(tys)} {kind}_args)") from None
    shown = ", ".join(str(t) for t in argtypes)
    try:
        disp.compile(argtypes)
    except NumbaError as e:
        raise ModError(f"{kind}: {name} does not compile for the cpu kernel with argument "
                       f"types ({shown}):\n{e}") from None
    ret = disp.overloads[argtypes].signature.return_type
    if kind == "score_mod":
        if not isinstance(ret, (types.Float, types.Integer)) or isinstance(ret,
                                                                           types.Boolean):
            raise ModError(f"score_mod: {name} returns {ret} for argument types ({shown}); "
                           "expected a float")
    elif not isinstance(ret, types.Boolean):
        raise ModError(f"mask_mod: {name} returns {ret} for argument types ({shown}); expected "
                       "a bool (True = may attend)")
    return disp, args


_I64 = (types.int64,) * 4


def given(args):
    """True unless ``args`` is None or an empty tuple / list (no ``==`` on arrays)."""
    return args is not None and not (isinstance(args, (tuple, list)) and len(args) == 0)


class ModSpec:
    """What the kernels receive: compiled mods, their argument tuples, block flags."""

    def __init__(self, smod, sargs, mmod, margs, bflags, bq, bk, raw):
        self.smod, self.sargs, self.mmod, self.margs = smod, sargs, mmod, margs
        self.bflags, self.bq, self.bk = bflags, bq, bk
        self.raw = raw  # (score_mod, score_mod_args, mask_mod, mask_mod_args) as given


def prepare(score_mod, score_mod_args, mask_mod, mask_mod_args, block_mask, *, batch,
            num_heads, seqlen_q, seqlen_k, compute_dtype):
    """Validate and compile the mods of one call (None when there are none)."""
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise AttentionError(f"block_mask: expected a BlockMask (create_block_mask), got "
                                 f"{type(block_mask).__name__}")
        if mask_mod is None:
            mask_mod, mask_mod_args = block_mask.mask_mod, block_mask.mask_mod_args
        elif mask_mod is not block_mask.mask_mod:
            raise AttentionError("mask_mod: differs from the block_mask's mask_mod; pass "
                                 "only block_mask (it carries its mask_mod)")
        block_mask._check(batch, num_heads, seqlen_q, seqlen_k)
    if score_mod is None and mask_mod is None:
        for name, a in (("score_mod_args", score_mod_args), ("mask_mod_args", mask_mod_args)):
            if given(a):
                raise AttentionError(f"{name}: given without its function")
        return None
    smod = sargs = mmod = margs = None
    if score_mod is not None:
        st = types.float64 if np.dtype(compute_dtype) == np.float64 else types.float32
        smod, sargs = _compile("score_mod", score_mod, (st,) + _I64, score_mod_args)
    elif given(score_mod_args):
        raise AttentionError("score_mod_args: given without score_mod")
    if mask_mod is not None:
        mmod, margs = _compile("mask_mod", mask_mod, _I64, mask_mod_args)
    elif given(mask_mod_args):
        raise AttentionError("mask_mod_args: given without mask_mod")
    bm = block_mask
    return ModSpec(smod, () if sargs is None else sargs, mmod, () if margs is None else margs,
                   None if bm is None else bm.flags, 1 if bm is None else bm.block_size[0],
                   1 if bm is None else bm.block_size[1],
                   (score_mod, sargs or (), mask_mod, margs or ()))


# ---------------------------------------------------------------------------------------
# block masks
# ---------------------------------------------------------------------------------------
EMPTY, PARTIAL, FULL = 0, 1, 2
DEFAULT_BLOCK = (128, 256)  # (queries, keys); the fused forward's key tiles are 256 keys


def _flags_py(mmod, margs, sq, sk, bq, bk, flags):
    nb, nh, nqb, nkb = flags.shape
    for t in prange(nb * nh * nqb * nkb):
        kb = t % nkb
        qb = (t // nkb) % nqb
        h = (t // (nkb * nqb)) % nh
        b = t // (nkb * nqb * nh)
        seen_t = False
        seen_f = False
        for i in range(qb * bq, min(sq, qb * bq + bq)):
            for j in range(kb * bk, min(sk, kb * bk + bk)):
                if mmod(b, h, i, j, *margs):
                    seen_t = True
                else:
                    seen_f = True
            if seen_t and seen_f:
                break
        flags[b, h, qb, kb] = FULL if not seen_f else (PARTIAL if seen_t else EMPTY)


_flags_kernel = ModKernel(numba.njit(parallel=True, nogil=True, error_model="numpy")(_flags_py),
                          ("mmod",))


class BlockMask:
    """Per-block flags of a mask_mod (see :func:`create_block_mask`).

    Attributes
    ----------
    flags : int8 ndarray (batch | 1, num_heads | 1, ceil(seqlen_q / bq), ceil(seqlen_k / bk))
        0 = no position of the block may attend, 1 = some may, 2 = all may.
    block_size : (int, int)
        (bq, bk), queries and keys per block.
    seqlen_q, seqlen_k : int
    mask_mod, mask_mod_args
        The function and the arguments the flags were evaluated with.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> def window(b, h, i, j, w):
    ...     return abs(i - j) <= w
    >>> bm = numba_attn.create_block_mask(window, 1, 1, 1024, 1024, mask_mod_args=(64,))
    >>> bm.flags.shape, bm.block_size, round(bm.sparsity, 3)
    ((1, 1, 8, 4), (128, 256), 0.562)
    """

    def __init__(self, flags, block_size, seqlen_q, seqlen_k, mask_mod, mask_mod_args):
        self.flags = flags
        self.block_size = block_size
        self.seqlen_q, self.seqlen_k = seqlen_q, seqlen_k
        self.mask_mod, self.mask_mod_args = mask_mod, mask_mod_args

    @property
    def sparsity(self):
        """Fraction of blocks that are empty (skipped by the kernel)."""
        return float(np.mean(self.flags == EMPTY)) if self.flags.size else 0.0

    def __repr__(self):
        return (f"BlockMask(shape={self.flags.shape}, block_size={self.block_size}, "
                f"seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, "
                f"sparsity={self.sparsity:.3f})")

    def _check(self, batch, num_heads, seqlen_q, seqlen_k):
        nb, nh = self.flags.shape[:2]
        if nb not in (1, batch) or nh not in (1, num_heads):
            raise AttentionError(f"block_mask: built for batch={nb}, num_heads={nh}; the call "
                                 f"has batch={batch}, num_heads={num_heads} (1 broadcasts)")
        if self.seqlen_q < seqlen_q or self.seqlen_k < seqlen_k:
            raise AttentionError(f"block_mask: built for seqlen_q={self.seqlen_q}, "
                                 f"seqlen_k={self.seqlen_k}; the call needs at least "
                                 f"seqlen_q={seqlen_q}, seqlen_k={seqlen_k}")


def create_block_mask(mask_mod: MaskMod, batch: int, num_heads: int, seqlen_q: int,
                      seqlen_k: int, *, mask_mod_args: tuple = (),
                      block_size: int | tuple[int, int] | None = None) -> BlockMask:
    """Evaluate ``mask_mod`` once, in parallel, into per-block flags for ``attention``.

    Parameters
    ----------
    mask_mod : function ``(b, h, q_idx, kv_idx, *mask_mod_args) -> bool``
        Plain Python or ``numba.njit``; True = may attend.
    batch, num_heads : int
        1 broadcasts (the mask does not depend on ``b`` / ``h``; evaluated with 0).
    seqlen_q, seqlen_k : int
        Positions covered (for attention_varlen, the longest rows; for a cache, its
        capacity or more than the longest row).
    mask_mod_args : tuple, default ()
    block_size : int or (int, int), optional
        Queries and keys per block, default (128, 256): the forward's key tiles are 256
        keys and its query strips 8 or 16 rows, so smaller blocks skip no more work.

    Returns
    -------
    BlockMask
        Pass it as ``attention(..., block_mask=bm)`` (it carries mask_mod and its args).

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> def causal(b, h, i, j):
    ...     return j <= i
    >>> bm = numba_attn.create_block_mask(causal, 1, 1, 512, 512, block_size=128)
    >>> bm.flags[0, 0].tolist()
    [[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]]
    """
    from .config import check_int

    batch = check_int("batch", batch, lo=1)
    num_heads = check_int("num_heads", num_heads, lo=1)
    seqlen_q = check_int("seqlen_q", seqlen_q, lo=0)
    seqlen_k = check_int("seqlen_k", seqlen_k, lo=0)
    if block_size is None:
        block_size = DEFAULT_BLOCK
    if isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise AttentionError(f"block_size: expected an int or (int, int), got "
                             f"{block_size!r}")
    bq, bk = (check_int("block_size", x, lo=1) for x in block_size)
    mmod, margs = _compile("mask_mod", mask_mod, _I64, mask_mod_args)
    flags = np.zeros((batch, num_heads, -(-seqlen_q // bq), -(-seqlen_k // bk)), np.int8)
    if flags.size:
        from ._jit import parallel_guard

        with parallel_guard():
            _flags_kernel(mmod, margs, np.int64(seqlen_q), np.int64(seqlen_k), np.int64(bq),
                          np.int64(bk), flags)
    return BlockMask(flags, (int(bq), int(bk)), seqlen_q, seqlen_k, mask_mod, margs)
