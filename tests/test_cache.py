"""KVCache / PagedKVCache bookkeeping: append, views, free/reset, pages, fork + copy-on-write,
and failures that leave the cache untouched."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn
from numba_attn import AttentionError, KVCache, PagedKVCache

HKV, D = 2, 4


def tokens(rng, batch, n, dtype=np.float32):
    return (rng.standard_normal((batch, n, HKV, D)).astype(dtype),
            rng.standard_normal((batch, n, HKV, D)).astype(dtype))


def snapshot(cache):
    """Everything a failed call must leave unchanged."""
    if isinstance(cache, PagedKVCache):
        return (cache.seqlens.copy(), cache.block_table.copy(), cache.refcount.copy(),
                cache.num_free_blocks, cache.k_pages.copy(), cache.v_pages.copy())
    return cache.seqlens.copy(), cache.k.copy(), cache.v.copy()


def assert_unchanged(cache, snap):
    for a, b in zip(snapshot(cache), snap):
        np.testing.assert_array_equal(a, b)


MAKERS = {
    "contiguous": lambda batch, cap: KVCache(batch, cap, HKV, D),
    "paged-bs1": lambda batch, cap: PagedKVCache(batch, batch * cap, 1, HKV, D,
                                                 max_seqlen=cap),
    "paged-bs3": lambda batch, cap: PagedKVCache(batch, batch * -(-cap // 3), 3, HKV, D,
                                                 max_seqlen=cap),
    "paged-bs16": lambda batch, cap: PagedKVCache(batch, batch * -(-cap // 16), 16, HKV, D,
                                                  max_seqlen=cap),
}


@pytest.mark.parametrize("kind", MAKERS)
def test_append_then_prefix_returns_what_was_written(rng, kind):
    cache = MAKERS[kind](3, 20)
    k1, v1 = tokens(rng, 3, 7)
    k2, v2 = tokens(rng, 3, 5)
    cache.append(k1, v1)
    cache.append(k2, v2)
    assert cache.seqlens.tolist() == [12, 12, 12]
    for b in range(3):
        k, v = cache.prefix(b)
        np.testing.assert_array_equal(k, np.concatenate([k1[b], k2[b]]))
        np.testing.assert_array_equal(v, np.concatenate([v1[b], v2[b]]))


@pytest.mark.parametrize("kind", MAKERS)
def test_free_and_reset(rng, kind):
    cache = MAKERS[kind](2, 10)
    cache.append(*tokens(rng, 2, 6))
    cache.free(1)
    assert cache.seqlens.tolist() == [6, 0]
    k0 = cache.prefix(0)[0].copy()
    cache.append(*tokens(rng, 2, 2))  # row 0 grows, row 1 restarts
    assert cache.seqlens.tolist() == [8, 2]
    np.testing.assert_array_equal(cache.prefix(0)[0][:6], k0)
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0]
    if isinstance(cache, PagedKVCache):
        assert cache.num_free_blocks == cache.num_blocks
        assert (cache.block_table == -1).all()


def test_contiguous_seqlens_are_settable_like_cache_seqlens(rng):
    cache = KVCache(2, 8, HKV, D)
    k, v = tokens(rng, 2, 8)
    cache.k[:] = k
    cache.v[:] = v
    cache.seqlens = [3, 8]
    np.testing.assert_array_equal(cache.prefix(0)[0], k[0, :3])
    cache.seqlens[0] = 5  # in-place edits are checked when the cache is used
    np.testing.assert_array_equal(cache.prefix(0)[1], v[0, :5])
    with pytest.raises(AttentionError, match="seqlens"):
        cache.seqlens = [9, 0]
    with pytest.raises(TypeError, match="seqlens"):
        cache.seqlens = [1.0, 2.0]
    cache.seqlens[1] = 99
    with pytest.raises(AttentionError, match="seqlens"):
        cache.append(*tokens(rng, 2, 1))


def test_paged_pages_come_from_the_pool_and_go_back(rng):
    cache = PagedKVCache(2, num_blocks=10, block_size=4, num_kv_heads=HKV, head_dim=D)
    cache.append(*tokens(rng, 2, 5))  # 2 pages per row
    assert cache.num_free_blocks == 6
    used = set(cache.block_table[:, :2].ravel().tolist())
    assert len(used) == 4 and (cache.block_table[:, 2:] == -1).all()
    cache.append(*tokens(rng, 2, 3))  # 8 tokens: still 2 pages per row
    assert cache.num_free_blocks == 6
    cache.append(*tokens(rng, 2, 1))  # 9 tokens: a third page
    assert cache.num_free_blocks == 4
    cache.free(0)
    assert cache.num_free_blocks == 7
    assert (cache.block_table[0] == -1).all()


def test_paged_seqlens_setter_shrinks_and_grows(rng):
    cache = PagedKVCache(2, num_blocks=8, block_size=4, num_kv_heads=HKV, head_dim=D)
    k, v = tokens(rng, 2, 12)
    cache.append(k, v)
    assert cache.num_free_blocks == 2
    cache.seqlens = [5, 12]  # row 0 releases its third page
    assert cache.num_free_blocks == 3
    np.testing.assert_array_equal(cache.prefix(0)[0], k[0, :5])
    with pytest.raises(AttentionError, match="seqlens"):
        cache.seqlens = [5, 40]  # 10 pages for row 1: only 3 free
    assert cache.seqlens.tolist() == [5, 12]
    with pytest.raises(ValueError):
        cache.seqlens[0] = 1  # read-only view: pages must follow lengths


def test_fork_shares_pages_and_copies_the_partial_page_on_write(rng):
    cache = PagedKVCache(2, num_blocks=8, block_size=4, num_kv_heads=HKV, head_dim=D)
    k, v = tokens(rng, 2, 6)
    cache.append(k, v)
    cache.free(1)
    free_before = cache.num_free_blocks
    cache.fork(0, 1)
    assert cache.num_free_blocks == free_before  # nothing copied yet
    np.testing.assert_array_equal(cache.block_table[1, :2], cache.block_table[0, :2])
    assert (cache.refcount[cache.block_table[0, :2]] == 2).all()
    k2, v2 = tokens(rng, 2, 3)
    cache.append(k2, v2)  # both write into the shared partial page -> one copy
    assert cache.block_table[0, 0] == cache.block_table[1, 0]  # full page still shared
    assert cache.block_table[0, 1] != cache.block_table[1, 1]  # partial page copied
    for b in range(2):
        np.testing.assert_array_equal(cache.prefix(b)[0],
                                      np.concatenate([k[0, :6], k2[b]]))
        np.testing.assert_array_equal(cache.prefix(b)[1],
                                      np.concatenate([v[0, :6], v2[b]]))
    cache.free(0)
    assert cache.refcount[cache.block_table[1, 0]] == 1  # the shared page survives
    np.testing.assert_array_equal(cache.prefix(1)[0][:6], k[0, :6])


def test_fork_of_a_row_ending_on_a_page_boundary_copies_nothing(rng):
    cache = PagedKVCache(2, num_blocks=6, block_size=4, num_kv_heads=HKV, head_dim=D)
    k, v = tokens(rng, 2, 8)
    cache.append(k, v)
    cache.fork(0, 1)
    assert cache.num_free_blocks == 4  # row 1's own pages went back to the pool
    cache.append(*tokens(rng, 2, 1))
    assert cache.num_free_blocks == 2  # one fresh page per row, no copies
    assert (cache.refcount[cache.block_table[0, :2]] == 2).all()


def test_fork_errors():
    cache = PagedKVCache(2, num_blocks=4, block_size=2, num_kv_heads=HKV, head_dim=D)
    with pytest.raises(AttentionError, match="same row"):
        cache.fork(1, 1)
    with pytest.raises(AttentionError, match="row"):
        cache.fork(0, 2)


@pytest.mark.parametrize("kind", MAKERS)
def test_overflow_raises_and_leaves_the_cache_unchanged(rng, kind):
    cache = MAKERS[kind](2, 10)
    cache.append(*tokens(rng, 2, 8))
    snap = snapshot(cache)
    with pytest.raises(AttentionError, match="overflow"):
        cache.append(*tokens(rng, 2, 3))
    assert_unchanged(cache, snap)


def test_out_of_pages_raises_and_leaves_the_cache_unchanged(rng):
    cache = PagedKVCache(2, num_blocks=5, block_size=4, num_kv_heads=HKV, head_dim=D)
    cache.append(*tokens(rng, 2, 8))  # 4 pages in use, 1 free
    snap = snapshot(cache)
    with pytest.raises(AttentionError, match="out of pages"):
        cache.append(*tokens(rng, 2, 1))  # needs 2
    assert_unchanged(cache, snap)


def test_copy_on_write_counts_pages_before_writing(rng):
    cache = PagedKVCache(3, num_blocks=3, block_size=4, num_kv_heads=HKV, head_dim=D)
    cache.append(*tokens(rng, 3, 2))  # 3 pages, none free
    cache.fork(0, 1)  # frees row 1's page, shares row 0's
    cache.fork(0, 2)
    assert cache.num_free_blocks == 2
    cache.append(*tokens(rng, 3, 1))  # rows 0, 1 copy; the last writer owns the original
    assert cache.num_free_blocks == 0
    assert len(set(cache.block_table[:, 0].tolist())) == 3
    cache.fork(0, 1)
    snap = snapshot(cache)
    with pytest.raises(AttentionError, match="out of pages"):
        cache.append(*tokens(rng, 3, 3))
    assert_unchanged(cache, snap)


def test_bad_block_table_entry_raises_and_leaves_the_cache_unchanged(rng):
    cache = PagedKVCache(2, num_blocks=6, block_size=2, num_kv_heads=HKV, head_dim=D)
    cache.append(*tokens(rng, 2, 3))
    cache.block_table[1, 1] = 6  # a hand-edited table naming a page past the pool
    snap = snapshot(cache)
    with pytest.raises(AttentionError, match=r"block_table: entry \[1, 1\] = 6"):
        cache.append(*tokens(rng, 2, 1))
    assert_unchanged(cache, snap)
    cache.block_table[1, 1] = -1
    with pytest.raises(AttentionError, match="block_table"):
        cache.prefix(1)


def test_append_touches_only_the_new_slots(rng):
    cache = KVCache(2, 50, HKV, D)
    cache.k[:] = 7.0
    cache.v[:] = 7.0
    cache.seqlens = [10, 20]
    k, v = tokens(rng, 2, 2)
    cache.append(k, v)
    np.testing.assert_array_equal(cache.k[0, 10:12], k[0])
    np.testing.assert_array_equal(cache.k[1, 20:22], k[1])
    mask = np.ones(cache.k.shape, bool)
    mask[0, 10:12] = mask[1, 20:22] = False
    assert (cache.k[mask] == 7.0).all() and (cache.v[mask] == 7.0).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float64], ids=["float16", "float64"])
def test_other_dtypes(rng, dtype):
    cache = PagedKVCache(1, num_blocks=4, block_size=3, num_kv_heads=HKV, head_dim=D,
                         dtype=dtype)
    k, v = tokens(rng, 1, 5, dtype)
    cache.append(k, v)
    assert cache.k_pages.dtype == dtype
    np.testing.assert_array_equal(cache.prefix(0)[0], k[0])


@pytest.mark.parametrize("make,exc,word", [
    (lambda: KVCache(0, 4, 1, 4), AttentionError, "batch"),
    (lambda: KVCache(1, 4, 1, 4, device="tpu"), AttentionError, "device"),
    (lambda: KVCache(1, 4, 1, 4, dtype=np.int32), TypeError, "dtype"),
    (lambda: PagedKVCache(1, 4, 0, 1, 4), AttentionError, "block_size"),
    (lambda: PagedKVCache(1, 0, 4, 1, 4), AttentionError, "num_blocks"),
    (lambda: KVCache(1, 4, 1, 4).free(3), AttentionError, "row"),
], ids=["batch-0", "device", "int-dtype", "block_size-0", "num_blocks-0", "free-bad-row"])
def test_constructor_errors(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


@pytest.mark.parametrize("k_shape,dtype,word", [
    ((2, 1, 3, D), np.float32, "k_new"),
    ((2, 1, HKV, D + 1), np.float32, "k_new"),
    ((3, 1, HKV, D), np.float32, "k_new"),
    ((2, 1, HKV, D), np.float64, "k_new"),
], ids=["heads", "head_dim", "batch", "dtype"])
def test_append_argument_errors(k_shape, dtype, word):
    cache = KVCache(2, 8, HKV, D)
    good = np.zeros((2, 1, HKV, D), np.float32)
    with pytest.raises((AttentionError, TypeError), match=word):
        cache.append(np.zeros(k_shape, dtype), good)
    assert cache.seqlens.tolist() == [0, 0]


def test_repr_names_the_state():
    assert "seqlens=[0, 0]" in repr(numba_attn.KVCache(2, 4, 1, 4))
