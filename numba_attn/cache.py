"""KV caches for autoregressive decoding: contiguous (:class:`KVCache`) and paged
(:class:`PagedKVCache`), on the CPU (numpy) or a CUDA device (numba device arrays).

A cache owns key/value storage and per-row lengths (``seqlens``, int32, FlashAttention's
``cache_seqlens``); :func:`numba_attn.attention_with_kvcache` appends new tokens in place
and attends over the valid prefix of every row, reading the storage where it lies (no
gather). Appending a token costs O(num_kv_heads x head_dim) whatever the cache length.

Every mutation is planned and checked first (room, free pages, block-table entries) and
only then written, so a call that raises leaves the cache as it was.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from . import dispatch as dp
from . import quant
from .config import AttentionError, _is_int, check_int
from .interop import Array

__all__ = ["KVCache", "PagedKVCache"]

_DEVICES = ("cpu", "cuda")


def _positive(name, x):
    if not _is_int(x) or int(x) <= 0:
        raise AttentionError(f"{name}: expected a positive int, got {x!r}")
    return check_int(name, x, lo=1)


def _storage_dtype(dtype, device):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: not a numpy dtype: {dtype!r}") from None
    if quant.is_quantized(dt):
        return dt
    try:
        dp.check_float("dtype", np.empty(0, dt))
    except TypeError as e:
        raise TypeError(f"{e} (a cache stores float16, bfloat16, float32, float64, int8, "
                        "ml_dtypes.float8_e4m3fn or float8_e5m2)") from None
    if device == "cuda" and dt not in (np.float16, np.float32, np.float64) and \
            not dp._is_bfloat16(dt):
        raise TypeError(f"dtype: a device cache stores float16, bfloat16, float32, "
                        f"float64, int8, float8_e4m3fn or float8_e5m2 (what the cuda "
                        f"kernels read), got {dt}")
    return dt


def _check_device(device):
    if device not in _DEVICES:
        raise AttentionError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    return device


def _alloc(shape, dtype, device):
    if device == "cpu":
        return np.zeros(shape, dtype)  # calloc: untouched pages cost nothing
    from numba import cuda

    return cuda.device_array(shape, dtype)  # never read outside the valid prefix


class _CacheBase:
    """What both caches share: shapes, seqlens, row checks, writing planned slots."""

    def _init_common(self, batch, num_kv_heads, head_dim, head_dim_v, dtype, device):
        self.batch = _positive("batch", batch)
        self.num_kv_heads = _positive("num_kv_heads", num_kv_heads)
        self.head_dim = _positive("head_dim", head_dim)
        self.head_dim_v = self.head_dim if head_dim_v is None else _positive("head_dim_v",
                                                                            head_dim_v)
        self.device = _check_device(device)
        self.dtype = _storage_dtype(dtype, self.device)
        self._seqlens = np.zeros(self.batch, np.int32)
        self.quantized = quant.is_quantized(self.dtype)

    def _alloc_scales(self, lead):
        """float32 scales per (storage position, kv head) for an 8-bit cache (on its
        device), else None."""
        if not self.quantized:
            return None, None
        return (_alloc(lead + (self.num_kv_heads,), np.float32, self.device),
                _alloc(lead + (self.num_kv_heads,), np.float32, self.device))

    def _flat_scales(self):
        n = int(np.prod(self.k_scale.shape[:-1]))
        return (self.k_scale.reshape(n, self.num_kv_heads),
                self.v_scale.reshape(n, self.num_kv_heads))

    def _row(self, row):
        if not _is_int(row):
            raise TypeError(f"row: expected an int, got {row!r}")
        r = int(row)
        if not 0 <= r < self.batch:
            raise AttentionError(f"row: must lie in [0, {self.batch}), got {r}")
        return r

    def _check_lengths(self, name, lens):
        """Current (or proposed) lengths as int64, each in [0, max_seqlen]."""
        a = dp.host(name, lens)
        if a.shape != (self.batch,):
            raise AttentionError(f"{name}: expected shape (batch,) = ({self.batch},), got "
                                 f"{a.shape}")
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
        bad = (a < 0) | (a > self.max_seqlen)
        if bad.any():
            i = int(np.argmax(bad))
            raise AttentionError(f"{name}: entries must lie in [0, {self.max_seqlen}] (the "
                                 f"cache's max_seqlen), got {name}[{i}] = {a[i]}")
        return a

    def check_new(self, k_new, v_new):
        """Validate new keys/values; returns (n_new, k, v) on the cache's device.

        k_new (batch, n_new, Hkv, D), v_new (batch, n_new, Hkv, Dv), the cache's dtype
        (or float32 for a host float16 / bfloat16 cache: rounded to it on append; any
        float dtype for an int8 cache: quantized on append, finite values only).
        """
        dp.check_rank("k_new", k_new, 4, "(batch, seqlen_new, num_kv_heads, head_dim)")
        dp.check_rank("v_new", v_new, 4, "(batch, seqlen_new, num_kv_heads, head_dim_v)")
        want_k = (self.batch, k_new.shape[1], self.num_kv_heads, self.head_dim)
        want_v = want_k[:3] + (self.head_dim_v,)
        for name, x, want in (("k_new", k_new, want_k), ("v_new", v_new, want_v)):
            if tuple(x.shape) != want:
                raise AttentionError(f"{name}: expected shape (batch, seqlen_new, "
                                     f"num_kv_heads, head_dim) = {want}, got "
                                     f"{tuple(x.shape)}")
            xdt = dp.as_np_dtype(x.dtype)
            if self.quantized:
                if xdt.kind != "f" and not dp._is_bfloat16(xdt):
                    raise TypeError(f"{name}: a {self.dtype} cache quantizes float keys and "
                                    f"values on append, got dtype {xdt}")
                xh = (_device_view(x).copy_to_host() if _on_device(x)  # new tokens only
                      else dp.host(name, x))
                if not np.isfinite(np.asarray(xh, np.float32)).all():
                    raise AttentionError(f"{name}: a {self.dtype} cache stores finite values "
                                         "only (inf / nan have no scale)")
            elif xdt != self.dtype and not (xdt == np.float32 and self.mixed_ok()):
                raise TypeError(f"{name}: dtype {xdt} differs from the cache's "
                                f"{self.dtype}; cast it with .astype")
            if _on_device(x) != (self.device == "cuda"):
                raise AttentionError(f"{name}: lives on {'cuda' if _on_device(x) else 'cpu'}"
                                     f", the cache on {self.device}")
            if self.device == "cuda" and not _device_view(x).is_c_contiguous():
                raise AttentionError(f"{name}: a device array must be C-contiguous; copy it "
                                     "on the device first")
        return int(k_new.shape[1])

    def mixed_ok(self):
        """True when float32 queries and new tokens may meet this cache's storage dtype
        (a host float16 / bfloat16 cache: converted in registers, computed in float32)."""
        return self.device == "cpu" and self.dtype.itemsize == 2

    def _write(self, slots, k_new, v_new):
        """Write token t of k_new/v_new (rows flattened batch-major) to storage row
        slots[t]."""
        ks, vs = self._flat_storage()
        n = slots.shape[0]
        if n == 0:
            return
        if self.device == "cuda":
            from numba import cuda

            from .cuda import cache_ops as cops

            slots = cuda.to_device(np.ascontiguousarray(slots, dtype=np.int64))
            if self.quantized:  # quantized on the device, scales beside the values
                ksc, vsc = self._flat_scales()
                cops.append_quantized(ks, ksc, slots, _device_view(k_new), n, self.dtype)
                cops.append_quantized(vs, vsc, slots, _device_view(v_new), n, self.dtype)
                return
            cops.append_rows(ks, slots, _device_view(k_new), n)
            cops.append_rows(vs, slots, _device_view(v_new), n)
            return
        from .cpu import cache_ops

        if self.quantized:  # quantize per (token, kv head); scales beside the values
            kq, kscale = quant.quantize(dp.host("k_new", k_new).reshape(
                n, self.num_kv_heads, self.head_dim), self.dtype)
            vq, vscale = quant.quantize(dp.host("v_new", v_new).reshape(
                n, self.num_kv_heads, self.head_dim_v), self.dtype)
            ksc, vsc = self._flat_scales()
            if self.dtype != np.int8:  # float8: a bit copy
                ks, vs, kq, vq = (a.view(np.uint8) for a in (ks, vs, kq, vq))
            cache_ops.append_rows(ks, slots, kq)
            cache_ops.append_rows(vs, slots, vq)
            ksc[slots] = kscale
            vsc[slots] = vscale
            return
        kn = np.ascontiguousarray(dp.host("k_new", k_new), dtype=self.dtype).reshape(
            n, self.num_kv_heads, self.head_dim)
        vn = np.ascontiguousarray(dp.host("v_new", v_new), dtype=self.dtype).reshape(
            n, self.num_kv_heads, self.head_dim_v)
        if self.dtype.itemsize == 2:  # float16/bfloat16: a bit copy (numba has no f16 math)
            ks, vs, kn, vn = (a.view(np.uint16) for a in (ks, vs, kn, vn))
        cache_ops.append_rows(ks, slots, kn)
        cache_ops.append_rows(vs, slots, vn)

    def append(self, k_new: Array, v_new: Array) -> None:
        """Append ``n_new`` tokens to every row without attending (e.g. after a prefill).

        Parameters
        ----------
        k_new : array (batch, n_new, num_kv_heads, head_dim)
        v_new : array (batch, n_new, num_kv_heads, head_dim_v)
            The cache's dtype and device; float32 for a host float16 / bfloat16 cache
            is rounded to the cache's dtype (nearest even); an int8 / float8 cache takes
            any float dtype, quantized per (token, kv head). Row ``b``'s tokens land at
            positions
            ``seqlens[b] .. seqlens[b] + n_new - 1``; ``seqlens`` then grows by ``n_new``.

        Raises
        ------
        AttentionError (ValueError)
            Shapes, no room (or no free page), bad block-table entries; nothing is written.
        TypeError
            A dtype other than the cache's (and other than float32 over a host float16 /
            bfloat16 cache).
        """
        if self.device == "cpu":  # torch CPU tensors, lists: numpy before anything is written
            k_new = k_new if k_new is None or _on_device(k_new) else dp.host("k_new", k_new)
            v_new = v_new if v_new is None or _on_device(v_new) else dp.host("v_new", v_new)
        n_new = self.check_new(k_new, v_new)
        plan = self.reserve(n_new, check_all=False)
        self._write(self.commit(plan), k_new, v_new)

    def _need_scales(self):
        if not self.quantized:
            raise AttentionError(f"cache: a {self.dtype} cache has no scales")

    def dequantized_prefix(self, row):
        """A row's valid keys and values as float32 host arrays (seqlens[row],
        num_kv_heads, head_dim[_v]): ``scale * value`` for an int8 cache, a float32 copy
        of the storage otherwise."""
        k, v = (_host(a) for a in self.prefix(row))
        if not self.quantized:
            return np.asarray(k, np.float32), np.asarray(v, np.float32)
        ks, vs = (_host(a) for a in self.prefix_scales(row))
        return quant.dequantize(k, ks), quant.dequantize(v, vs)

    def __repr__(self):
        return (f"{type(self).__name__}(batch={self.batch}, max_seqlen={self.max_seqlen}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype.name}, device={self.device!r}, "
                f"seqlens={self._seqlens.tolist()})")


def _host(x):
    """A host copy of a device array; host arrays as they are."""
    return x.copy_to_host() if hasattr(x, "copy_to_host") else x


def _on_device(x):
    return dp.array_device(x) == "cuda" or hasattr(x, "copy_to_host")


def _device_view(x):
    """A numba device array viewing ``x`` (numba, CuPy, torch CUDA, ...)."""
    if hasattr(x, "copy_to_host"):
        return x
    from numba import cuda

    return cuda.as_cuda_array(x)


class KVCache(_CacheBase):
    """Contiguous KV cache: ``max_seqlen`` preallocated positions per sequence row.

    Parameters
    ----------
    batch : int
        Sequence rows (slots).
    max_seqlen : int
        Positions per row.
    num_kv_heads, head_dim : int
    dtype : numpy dtype, default float32
        float16, bfloat16, float32 or float64 on the CPU (all read in place; float16 /
        bfloat16 converted in registers, with float32 accumulation); ``np.int8``,
        ``ml_dtypes.float8_e4m3fn`` or ``ml_dtypes.float8_e5m2`` on the CPU or CUDA:
        8-bit values with float32 scales per (position, kv head) in ``k_scale`` /
        ``v_scale`` (see :mod:`numba_attn.quant`; new keys/values of any float dtype are
        quantized on append, on the cache's device; q is float32, float16 or bfloat16;
        the kernels dequantize in registers); float16, bfloat16, float32 or float64 on
        CUDA (read in place, float32 accumulation for float16 and bfloat16).
    device : {"cpu", "cuda"}, default "cpu"
        "cuda" stores numba device arrays.
    head_dim_v : int, default head_dim

    Attributes
    ----------
    k : array (batch, max_seqlen, num_kv_heads, head_dim)
    v : array (batch, max_seqlen, num_kv_heads, head_dim_v)
        The storage; row ``b``'s valid keys are ``k[b, :seqlens[b]]``. A caller may fill it
        directly (e.g. a prompt) and then set ``seqlens``.
    k_scale, v_scale : array (batch, max_seqlen, num_kv_heads) float32, or None
        8-bit caches (numpy, or numba device arrays for ``device="cuda"``): key ``j`` of
        row ``b``, head ``h`` is
        ``k_scale[b, j, h] * k[b, j, h, :]`` (``quant.quantize``: max|x| / 127, 0 for
        an all-zero row); None for float caches. Filled on append; a caller filling
        ``k`` directly fills these too.
    seqlens : ndarray (batch,) int32
        Valid length of each row; rows may differ. Writable (as FlashAttention's
        ``cache_seqlens``): assign a new vector or edit entries; values are checked
        (``0 <= seqlens <= max_seqlen``) at every call.

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> cache = numba_attn.KVCache(2, 16, num_kv_heads=1, head_dim=4)
    >>> cache.append(np.ones((2, 3, 1, 4), np.float32), np.ones((2, 3, 1, 4), np.float32))
    >>> cache.seqlens.tolist(), cache.prefix(0)[0].shape
    ([3, 3], (3, 1, 4))
    """

    kind = "contiguous"

    def __init__(self, batch: int, max_seqlen: int, num_kv_heads: int, head_dim: int,
                 dtype: DTypeLike = np.float32, device: str = "cpu",
                 head_dim_v: int | None = None) -> None:
        self._init_common(batch, num_kv_heads, head_dim, head_dim_v, dtype, device)
        self.max_seqlen = _positive("max_seqlen", max_seqlen)
        self.k = _alloc((self.batch, self.max_seqlen, self.num_kv_heads, self.head_dim),
                        self.dtype, self.device)
        self.v = _alloc((self.batch, self.max_seqlen, self.num_kv_heads, self.head_dim_v),
                        self.dtype, self.device)
        self.k_scale, self.v_scale = self._alloc_scales((self.batch, self.max_seqlen))

    @property
    def seqlens(self):
        """Valid length of each row, int32 (batch,); assignable (checked)."""
        return self._seqlens

    @seqlens.setter
    def seqlens(self, value):
        self._seqlens[:] = self._check_lengths("seqlens", value)

    def reset(self):
        """Empty every row (storage is kept, not cleared)."""
        self._seqlens[:] = 0

    def free(self, row):
        """Empty one row."""
        self._seqlens[self._row(row)] = 0

    def prefix(self, row):
        """Views ``(k[row, :seqlens[row]], v[row, :seqlens[row]])`` of a row's valid keys."""
        r = self._row(row)
        n = int(self._check_lengths("seqlens", self._seqlens)[r])
        return self.k[r, :n], self.v[r, :n]

    def prefix_scales(self, row):
        """Views ``(k_scale[row, :n], v_scale[row, :n])`` (int8 caches)."""
        self._need_scales()
        r = self._row(row)
        n = int(self._check_lengths("seqlens", self._seqlens)[r])
        return self.k_scale[r, :n], self.v_scale[r, :n]

    # -- used by attention_with_kvcache ------------------------------------------------
    def _flat_storage(self):
        b, s = self.batch, self.max_seqlen
        return (self.k.reshape(b * s, self.num_kv_heads, self.head_dim),
                self.v.reshape(b * s, self.num_kv_heads, self.head_dim_v))

    def reserve(self, n_new, check_all=True):
        """Check that every row has room for ``n_new`` more tokens; nothing changes."""
        old = self._check_lengths("cache.seqlens", self._seqlens)
        new = old + n_new
        if (new > self.max_seqlen).any():
            b = int(np.argmax(new > self.max_seqlen))
            raise AttentionError(
                f"cache: overflow, row {b} holds {old[b]} of {self.max_seqlen} positions and "
                f"{n_new} more do not fit; free rows or use a larger max_seqlen")
        return old, new

    def commit(self, plan):
        """Advance seqlens; returns the storage row (int64) of every new token."""
        old, new = plan
        n_new = int(new[0] - old[0]) if len(old) else 0
        pos = old[:, None] + np.arange(n_new, dtype=np.int64)[None, :]
        slots = np.arange(self.batch, dtype=np.int64)[:, None] * self.max_seqlen + pos
        self._seqlens[:] = new
        return np.ascontiguousarray(slots.reshape(-1))

    def layout(self):
        """(k, v, k_start (batch,) int64, block_table, block_size) for a dispatch.Problem."""
        ks, vs = self._flat_storage()
        k_start = np.arange(self.batch, dtype=np.int64) * self.max_seqlen
        return ks, vs, k_start, np.zeros((self.batch, 1), np.int32), dp.CONTIGUOUS_BLOCK


class PagedKVCache(_CacheBase):
    """Paged KV cache (vLLM's PagedAttention layout): fixed-size pages from a shared pool.

    Row ``b``'s key ``j`` lives in page ``block_table[b, j // block_size]`` at slot
    ``j % block_size``. Pages are taken from the free pool as a row grows and returned by
    :meth:`free`; :meth:`fork` shares a row's pages with another (prefix sharing) with
    copy-on-write: a page shared by several rows is copied before a row writes into it.

    Parameters
    ----------
    batch : int
        Sequence rows (slots).
    num_blocks : int
        Pages in the pool.
    block_size : int
        Tokens per page, any value >= 1.
    num_kv_heads, head_dim : int
    dtype : numpy dtype, default float32
        As :class:`KVCache`.
    device : {"cpu", "cuda"}, default "cpu"
    max_seqlen : int, default num_blocks * block_size
        Longest row; the block table has ``ceil(max_seqlen / block_size)`` columns.
    head_dim_v : int, default head_dim

    Attributes
    ----------
    k_pages : array (num_blocks, block_size, num_kv_heads, head_dim)
    v_pages : array (num_blocks, block_size, num_kv_heads, head_dim_v)
    k_scale, v_scale : ndarray (num_blocks, block_size, num_kv_heads) float32, or None
        int8 caches: the scale of each page slot's key / value row per kv head (as
        :class:`KVCache`); copied with its page on copy-on-write. None for float caches.
    block_table : ndarray (batch, max_blocks_per_seq) int32
        Page of each block of each row; -1 where a row has no page. Entries covering a
        row's valid keys are checked at every call (editing it by hand bypasses the
        reference counts of the pool).
    seqlens : ndarray (batch,) int32, read-only view
        Assigning a new vector allocates or releases pages (new pages hold stale data).
    num_free_blocks : int

    Examples
    --------
    >>> import numpy as np, numba_attn
    >>> cache = numba_attn.PagedKVCache(2, num_blocks=8, block_size=4, num_kv_heads=1,
    ...                                 head_dim=4)
    >>> cache.append(np.ones((2, 5, 1, 4), np.float32), np.ones((2, 5, 1, 4), np.float32))
    >>> cache.num_free_blocks          # two pages per row
    4
    >>> cache.fork(0, 1)               # row 1 now shares row 0's pages
    >>> cache.num_free_blocks
    6
    """

    kind = "paged"

    def __init__(self, batch: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: DTypeLike = np.float32, device: str = "cpu",
                 max_seqlen: int | None = None, head_dim_v: int | None = None) -> None:
        self._init_common(batch, num_kv_heads, head_dim, head_dim_v, dtype, device)
        self.num_blocks = _positive("num_blocks", num_blocks)
        self.block_size = _positive("block_size", block_size)
        self.max_seqlen = (self.num_blocks * self.block_size if max_seqlen is None
                           else _positive("max_seqlen", max_seqlen))
        self.max_blocks_per_seq = -(-self.max_seqlen // self.block_size)
        shape = (self.num_blocks, self.block_size, self.num_kv_heads)
        self.k_pages = _alloc(shape + (self.head_dim,), self.dtype, self.device)
        self.v_pages = _alloc(shape + (self.head_dim_v,), self.dtype, self.device)
        self.k_scale, self.v_scale = self._alloc_scales(shape[:2])
        self.block_table = np.full((self.batch, self.max_blocks_per_seq), -1, np.int32)
        self.refcount = np.zeros(self.num_blocks, np.int32)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...

    # -- public state --------------------------------------------------------------------
    @property
    def seqlens(self):
        """Valid length of each row, int32 (batch,), a read-only view; assigning a
        new vector allocates or releases pages."""
        view = self._seqlens.view()
        view.flags.writeable = False
        return view

    @seqlens.setter
    def seqlens(self, value):
        new = self._check_lengths("seqlens", value)
        old = self._seqlens.astype(np.int64)
        self._check_table(old, np.minimum(old, new))  # the entries released below
        grow = np.maximum(self._nblk(new) - self._nblk(old), 0)
        release = sum(self._releasable(b, int(self._nblk(new[b])), int(self._nblk(old[b])))
                      for b in range(self.batch))
        if grow.sum() > len(self._free) + release:
            raise AttentionError(f"seqlens: needs {int(grow.sum())} new pages, "
                                 f"{len(self._free) + release} are free")
        for b in range(self.batch):  # shrink first so grown rows can reuse pages
            for blk in range(int(self._nblk(new[b])), int(self._nblk(old[b]))):
                self._release_block(b, blk)
        for b in range(self.batch):
            for blk in range(int(self._nblk(old[b])), int(self._nblk(new[b]))):
                self.block_table[b, blk] = self._take()
        self._seqlens[:] = new

    @property
    def num_free_blocks(self):
        """Pages left in the free pool."""
        return len(self._free)

    def _nblk(self, n):
        return -(-n // self.block_size)

    def _releasable(self, b, lo, hi):
        return sum(1 for blk in range(lo, hi) if self.refcount[self.block_table[b, blk]] == 1)

    def _take(self):
        page = self._free.pop()
        self.refcount[page] = 1
        return page

    def _release_block(self, b, blk):
        page = int(self.block_table[b, blk])
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            self._free.append(page)
        self.block_table[b, blk] = -1

    def _check_table(self, lens, from_lens=None):
        """Entries covering each row's keys ``from_lens[b] .. lens[b] - 1`` (default: all
        from 0) must name pages in the pool."""
        nblk = self._nblk(lens)
        bt = self.block_table
        if from_lens is None:
            used = np.arange(self.max_blocks_per_seq)[None, :] < nblk[:, None]
            bad_at = np.argwhere(used & ((bt < 0) | (bt >= self.num_blocks)))
        else:  # a few entries per row: O(batch), not O(max_blocks_per_seq)
            first = np.asarray(from_lens) // self.block_size
            bad_at = [(b, blk) for b in range(self.batch)
                      for blk in range(int(first[b]), int(nblk[b]))
                      if not 0 <= bt[b, blk] < self.num_blocks]
        if len(bad_at):
            b, blk = (int(i) for i in bad_at[0])
            raise AttentionError(
                f"cache.block_table: entry [{b}, {blk}] = {int(bt[b, blk])} is not a page in "
                f"[0, {self.num_blocks}) but row {b} holds {int(lens[b])} keys")

    # -- slot management -----------------------------------------------------------------
    def reset(self):
        """Empty every row and return all pages to the pool."""
        self._seqlens[:] = 0
        self.block_table[:] = -1
        self.refcount[:] = 0
        self._free = list(range(self.num_blocks - 1, -1, -1))

    def free(self, row):
        """Empty one row and return the pages only it used to the pool."""
        r = self._row(row)
        n = int(self._seqlens[r])
        self._check_table(np.where(np.arange(self.batch) == r, n, 0))
        for blk in range(int(self._nblk(n))):
            self._release_block(r, blk)
        self._seqlens[r] = 0

    def fork(self, src, dst):
        """Make row ``dst`` a copy of row ``src`` that shares its pages (prefix sharing).

        ``dst``'s own pages are released first. Pages stay shared (reference counted) until
        either row writes into one: the partial last page is then copied for the writer
        (copy-on-write), full pages stay shared for good.

        Examples
        --------
        >>> import numpy as np, numba_attn
        >>> cache = numba_attn.PagedKVCache(2, num_blocks=4, block_size=2, num_kv_heads=1,
        ...                                 head_dim=2)
        >>> kv = np.ones((2, 3, 1, 2), np.float32)
        >>> cache.append(kv, kv)
        >>> cache.fork(0, 1)
        >>> cache.block_table[1].tolist() == cache.block_table[0].tolist(), cache.num_free_blocks
        (True, 2)
        """
        s, d = self._row(src), self._row(dst)
        if s == d:
            raise AttentionError(f"fork: src and dst are the same row ({s})")
        n = int(self._seqlens[s])
        self._check_table(np.where(np.arange(self.batch) == s, n, 0))
        self.free(d)
        nb = int(self._nblk(n))
        self.block_table[d, :nb] = self.block_table[s, :nb]
        for page in self.block_table[s, :nb]:
            self.refcount[page] += 1
        self._seqlens[d] = n

    def prefix(self, row):
        """Copies ``(k, v)`` of a row's valid keys gathered from its pages, host arrays
        (seqlens[row], num_kv_heads, head_dim[_v])."""
        r = self._row(row)
        n = int(self._seqlens[r])
        self._check_table(np.where(np.arange(self.batch) == r, n, 0))
        return self._gather(r, n, (self.k_pages, self.v_pages))

    def prefix_scales(self, row):
        """Copies ``(k_scale, v_scale)`` of a row's valid keys (seqlens[row],
        num_kv_heads), gathered from its pages (int8 caches)."""
        self._need_scales()
        r = self._row(row)
        n = int(self._seqlens[r])
        self._check_table(np.where(np.arange(self.batch) == r, n, 0))
        return self._gather(r, n, (self.k_scale, self.v_scale))

    def _gather(self, r, n, stores):
        pages = self.block_table[r, :self._nblk(n)]
        out = []
        for store in stores:
            host = store.copy_to_host() if self.device == "cuda" else store
            out.append(host[pages].reshape((-1,) + host.shape[2:])[:n].copy())
        return tuple(out)

    # -- used by attention_with_kvcache --------------------------------------------------
    def _flat_storage(self):
        n = self.num_blocks * self.block_size
        return (self.k_pages.reshape(n, self.num_kv_heads, self.head_dim),
                self.v_pages.reshape(n, self.num_kv_heads, self.head_dim_v))

    def reserve(self, n_new, check_all=True):
        """Plan room for ``n_new`` more tokens per row: pages to take and pages to copy
        (copy-on-write). Raises on overflow or bad block-table entries; nothing changes.

        ``check_all=False`` checks only the entries an append writes through (the partial
        last page), keeping an append independent of the cache length.
        """
        old = self._check_lengths("cache.seqlens", self._seqlens)
        new = old + n_new
        if (new > self.max_seqlen).any():
            b = int(np.argmax(new > self.max_seqlen))
            raise AttentionError(
                f"cache: overflow, row {b} holds {old[b]} of max_seqlen = {self.max_seqlen} "
                f"positions and {n_new} more do not fit; free rows or use a larger max_seqlen")
        self._check_table(old, None if check_all else old)
        steps = []  # (row, block, page to copy from or -1)
        shared = {}  # page -> reference count after the planned copies
        for b in range(self.batch if n_new else 0):
            have = int(self._nblk(old[b]))
            if old[b] % self.block_size:  # writes start inside the partial last page
                page = int(self.block_table[b, have - 1])
                rc = shared.get(page, int(self.refcount[page]))
                if rc > 1:
                    steps.append((b, have - 1, page))
                    shared[page] = rc - 1
            for blk in range(have, int(self._nblk(new[b]))):
                steps.append((b, blk, -1))
        if len(steps) > len(self._free):
            raise AttentionError(
                f"cache: out of pages, this call needs {len(steps)} new pages of "
                f"{self.block_size} tokens and {len(self._free)} are free; free rows or "
                f"use more blocks")
        return old, new, steps

    def commit(self, plan):
        """Take/copy the planned pages, advance seqlens; returns storage rows of new tokens."""
        old, new, steps = plan
        for b, blk, src in steps:
            page = self._take()
            if src >= 0:
                self._copy_page(src, page)
                self.refcount[src] -= 1
            self.block_table[b, blk] = page
        n_new = int(new[0] - old[0]) if len(old) else 0
        pos = old[:, None] + np.arange(n_new, dtype=np.int64)[None, :]
        pages = self.block_table[np.arange(self.batch)[:, None], pos // self.block_size]
        slots = pages.astype(np.int64) * self.block_size + pos % self.block_size
        self._seqlens[:] = new
        return np.ascontiguousarray(slots.reshape(-1))

    def _copy_page(self, src, dst):
        if self.device == "cuda":
            from .cuda import cache_ops as cops

            cops.copy_page(self.k_pages, src, dst)
            cops.copy_page(self.v_pages, src, dst)
            if self.quantized:  # the scales travel with their page
                shape = self.k_scale.shape + (1,)
                cops.copy_page(self.k_scale.reshape(shape), src, dst)
                cops.copy_page(self.v_scale.reshape(shape), src, dst)
        else:
            self.k_pages[dst] = self.k_pages[src]
            self.v_pages[dst] = self.v_pages[src]
            if self.quantized:
                self.k_scale[dst] = self.k_scale[src]
                self.v_scale[dst] = self.v_scale[src]

    def layout(self):
        """(k, v, k_start (batch,) int64, block_table, block_size) for a dispatch.Problem."""
        ks, vs = self._flat_storage()
        return ks, vs, np.zeros(self.batch, np.int64), self.block_table, self.block_size
