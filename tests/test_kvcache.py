"""attention_with_kvcache: generation loops against one full attention call, every option
against the reference backend on the same cache, paged == contiguous, forks, and failures
that leave the cache untouched."""
from __future__ import annotations

import numpy as np
import pytest
from numerics import assert_close

import numba_attn
from numba_attn import AttentionError, KVCache, PagedKVCache, reference
from numba_attn import reference_rope as rr

H, HKV = 4, 2

KINDS = {
    "contiguous": lambda b, cap, d, dt=np.float32: KVCache(b, cap, HKV, d, dtype=dt),
    "paged-bs1": lambda b, cap, d, dt=np.float32: PagedKVCache(b, b * cap, 1, HKV, d, dt,
                                                               max_seqlen=cap),
    "paged-bs5": lambda b, cap, d, dt=np.float32: PagedKVCache(b, b * -(-cap // 5) + 2, 5,
                                                               HKV, d, dt, max_seqlen=cap),
    "paged-bs16": lambda b, cap, d, dt=np.float32: PagedKVCache(b, b * -(-cap // 16), 16,
                                                                HKV, d, dt, max_seqlen=cap),
}

ROTARY = {  # (head_dim, rotary_dim or None, interleaved)
    "no-rotary": (8, None, False),
    "neox": (8, 8, False),
    "gptj-partial": (10, 6, True),
}

OPTIONS = {
    "causal": dict(causal=True),
    "causal-window-softcap": dict(causal=True, window=(4, 0), softcap=2.0),
}


def rotated(x, table, positions, interleaved):
    """float64 reference rotation of x (T, heads, D) at positions (T,)."""
    if table is None:
        return np.asarray(x, np.float64)
    return rr.apply_rotary(x, table[0], table[1], positions, interleaved)


def gather_rows(x, starts, n):
    """x[b, starts[b]:starts[b] + n] for every row b, stacked (batch, n, ...)."""
    return np.stack([x[b, s:s + n] for b, s in enumerate(starts)])


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("chunk", [1, 3], ids=["token-by-token", "chunks-of-3"])
@pytest.mark.parametrize("rot", ROTARY)
@pytest.mark.parametrize("kind", KINDS)
def test_generation_loop_equals_one_full_attention(rng, kind, rot, chunk, opts):
    d, rdim, inter = ROTARY[rot]
    opts = OPTIONS[opts]
    batch, total, prefill = 3, 14, 8
    prompts = np.array([8, 3, 6])  # ragged: rows are cut back after the shared prefill
    q = rng.standard_normal((batch, total, H, d)).astype(np.float32)
    k = rng.standard_normal((batch, total, HKV, d)).astype(np.float32)
    v = rng.standard_normal((batch, total, HKV, d)).astype(np.float32)
    tables = None
    kw = dict(opts)
    if rdim:
        tables = numba_attn.rotary_cos_sin(32, rdim)
        kw.update(rotary_cos=tables[0], rotary_sin=tables[1], rotary_interleaved=inter)
    cache = KINDS[kind](batch, total, d)

    # expected: one causal call per row over the whole (rotated) sequence
    pos = np.arange(total)
    t64 = None if tables is None else rr.rotary_cos_sin(32, rdim)
    expected = np.stack([reference.attention(
        rotated(q[b], t64, pos, inter)[None], rotated(k[b], t64, pos, inter)[None],
        v[b].astype(np.float64)[None], **opts)[0] for b in range(batch)])

    out = numba_attn.attention_with_kvcache(q[:, :prefill], cache, k[:, :prefill],
                                            v[:, :prefill], **kw)
    assert_close(out, expected[:, :prefill], np.float32, "prefill")
    if isinstance(cache, KVCache):
        cache.seqlens[:] = prompts
    else:
        cache.seqlens = prompts
    lens = prompts.copy()
    while lens.max() + chunk <= total:
        sl = slice(None)
        out = numba_attn.attention_with_kvcache(
            gather_rows(q, lens, chunk), cache, gather_rows(k, lens, chunk),
            gather_rows(v, lens, chunk), **kw)
        assert_close(out, gather_rows(expected, lens, chunk)[sl], np.float32,
                     f"step at lens {lens.tolist()}")
        lens += chunk
        assert cache.seqlens.tolist() == lens.tolist()


def filled(rng, kind, batch, lens, d, dtype=np.float32, cap=None):
    """A cache of ``kind`` holding random keys, rows cut to ``lens``; also its k, v arrays."""
    cap = cap or int(max(lens))
    cache = KINDS[kind](batch, cap, d, dtype)
    k = rng.standard_normal((batch, cap, HKV, d)).astype(dtype)
    v = rng.standard_normal((batch, cap, HKV, d)).astype(dtype)
    cache.append(k, v)
    if isinstance(cache, KVCache):
        cache.seqlens[:] = lens
    else:
        cache.seqlens = lens
    return cache, k, v


def option_values(rng, name, batch, sq, sk):
    return {
        "plain": {},
        "causal": dict(causal=True),
        "top_left": dict(causal="top_left"),
        "window": dict(window=(40, 3)),
        "softcap-scale": dict(softcap=1.5, scale=0.7),
        "alibi": dict(alibi_slopes=rng.uniform(0.01, 0.2, (batch, H)), causal=True),
        "bias": dict(bias=rng.standard_normal((batch, 1, sq, sk))),
        "mask": dict(mask=rng.random((batch, H, sq, sk)) > 0.3),
        "sinks": dict(sinks=rng.standard_normal(H)),
    }[name]


@pytest.mark.parametrize("name", ["plain", "causal", "top_left", "window", "softcap-scale",
                                  "alibi", "bias", "mask", "sinks"])
@pytest.mark.parametrize("shape", ["one-row-long", "three-rows-ragged", "chunk-of-2"])
@pytest.mark.parametrize("kind", ["contiguous", "paged-bs16", "paged-bs5"])
def test_options_match_the_reference_backend(rng, kind, shape, name):
    """Attention over an existing cache (no append) on the CPU kernels vs the reference.

    ``one-row-long``: 1100 keys and one kv group, so the launcher splits the keys too;
    ``three-rows-ragged``: rows of different lengths, the decode kernel's own splits.
    """
    batch, lens, sq = {"one-row-long": (1, [1100], 1),
                       "three-rows-ragged": (3, [1100, 0, 517], 1),
                       "chunk-of-2": (2, [300, 41], 2)}[shape]
    cache, _, _ = filled(rng, kind, batch, lens, 8)
    q = rng.standard_normal((batch, sq, H, 8)).astype(np.float32)
    opts = option_values(rng, name, batch, sq, max(lens))
    got, got_lse = numba_attn.attention_with_kvcache(q, cache, return_lse=True, **opts)
    exp, exp_lse = numba_attn.attention_with_kvcache(q, cache, return_lse=True,
                                                     backend="reference", **opts)
    assert_close(got, exp, np.float32)
    assert_close(got_lse, exp_lse, np.float32, "lse")
    assert got_lse.shape == (batch, H, sq)


@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_paged_equals_contiguous(rng, block_size):
    batch, cap, d = 2, 40, 8
    k = rng.standard_normal((batch, cap, HKV, d)).astype(np.float32)
    v = rng.standard_normal((batch, cap, HKV, d)).astype(np.float32)
    q = rng.standard_normal((batch, cap, H, d)).astype(np.float32)
    cont = KVCache(batch, cap, HKV, d)
    paged = PagedKVCache(batch, batch * -(-cap // block_size), block_size, HKV, d,
                         max_seqlen=cap)
    for s0, s1 in [(0, 9), (9, 10), (10, 23), (23, 24), (24, 40)]:
        kw = dict(causal=True, softcap=3.0, return_lse=True)
        a = numba_attn.attention_with_kvcache(q[:, s0:s1], cont, k[:, s0:s1], v[:, s0:s1],
                                              **kw)
        b = numba_attn.attention_with_kvcache(q[:, s0:s1], paged, k[:, s0:s1], v[:, s0:s1],
                                              **kw)
        np.testing.assert_allclose(b[0], a[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b[1], a[1], rtol=1e-6, atol=1e-6)


def test_forked_rows_stay_correct_after_either_side_appends(rng):
    d = 8
    cache = PagedKVCache(2, num_blocks=12, block_size=4, num_kv_heads=HKV, head_dim=d)
    prompt_k = rng.standard_normal((2, 6, HKV, d)).astype(np.float32)
    prompt_v = rng.standard_normal((2, 6, HKV, d)).astype(np.float32)
    cache.append(prompt_k, prompt_v)
    cache.fork(0, 1)  # row 1 continues row 0's prompt (beam search / parallel sampling)
    seqs_k = [list(prompt_k[0]), list(prompt_k[0])]
    seqs_v = [list(prompt_v[0]), list(prompt_v[0])]
    for step in range(5):
        kn = rng.standard_normal((2, 1, HKV, d)).astype(np.float32)
        vn = rng.standard_normal((2, 1, HKV, d)).astype(np.float32)
        q = rng.standard_normal((2, 1, H, d)).astype(np.float32)
        got = numba_attn.attention_with_kvcache(q, cache, kn, vn, causal=True)
        for b in range(2):
            seqs_k[b].append(kn[b, 0])
            seqs_v[b].append(vn[b, 0])
            exp = reference.attention(q[b:b + 1], np.array(seqs_k[b])[None],
                                      np.array(seqs_v[b])[None], causal=True)
            assert_close(got[b:b + 1], exp, np.float32, f"row {b} step {step}")
    assert cache.block_table[0, 0] == cache.block_table[1, 0]  # the full page stays shared


@pytest.mark.parametrize("dtype", [np.float64, np.float16], ids=["float64", "float16"])
def test_other_dtypes(rng, dtype):
    cache, k, v = filled(rng, "paged-bs5", 2, [30, 12], 8, dtype=dtype, cap=31)
    q = rng.standard_normal((2, 1, H, 8)).astype(dtype)
    kn = rng.standard_normal((2, 1, HKV, 8)).astype(dtype)
    got = numba_attn.attention_with_kvcache(q, cache, kn, kn, causal=True)
    assert got.dtype == dtype
    for b, n in enumerate([30, 12]):
        kk = np.concatenate([k[b, :n], kn[b]])[None]
        vv = np.concatenate([v[b, :n], kn[b]])[None]
        exp = reference.attention(q[b:b + 1], kk, vv, causal=True)
        tol = 1e-10 if dtype == np.float64 else 3e-3
        np.testing.assert_allclose(got[b:b + 1].astype(np.float64), exp, rtol=tol, atol=tol)


def test_empty_cache_gives_zero_output_and_minus_inf_lse(rng):
    cache = KVCache(2, 8, HKV, 8)
    q = rng.standard_normal((2, 1, H, 8)).astype(np.float32)
    out, lse = numba_attn.attention_with_kvcache(q, cache, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


def test_inputs_are_not_modified_and_out_is_written(rng):
    cache = KVCache(1, 8, HKV, 8)
    cos, sin = numba_attn.rotary_cos_sin(8, 8)
    q = rng.standard_normal((1, 2, H, 8)).astype(np.float32)
    kn = rng.standard_normal((1, 2, HKV, 8)).astype(np.float32)
    q0, k0 = q.copy(), kn.copy()
    out = np.empty_like(q)
    got = numba_attn.attention_with_kvcache(q, cache, kn, kn, rotary_cos=cos, rotary_sin=sin,
                                            causal=True, out=out)
    assert got is out
    np.testing.assert_array_equal(q, q0)
    np.testing.assert_array_equal(kn, k0)
    np.testing.assert_allclose(cache.k[0, :2], rr.apply_rotary(kn[0], cos, sin, [0, 1]),
                               rtol=1e-6, atol=1e-6)


def snapshot(cache):
    if isinstance(cache, PagedKVCache):
        return (cache.seqlens.copy(), cache.block_table.copy(), cache.refcount.copy(),
                cache.num_free_blocks, cache.k_pages.copy(), cache.v_pages.copy())
    return cache.seqlens.copy(), cache.k.copy(), cache.v.copy()


def _bad_table(cache):
    cache.block_table[0, 0] = cache.num_blocks


BAD_CALLS = {  # id: (call tweaks, exception, word in the message)
    "overflow": (dict(n_new=5), AttentionError, "overflow"),
    "bad-window": (dict(window=(-2, 0)), AttentionError, "window"),
    "q-dtype": (dict(q_dtype=np.float64), TypeError, "q"),
    "k_new-only": (dict(v_none=True), AttentionError, "k_new"),
    "rotary-past-table": (dict(rot_len=7), AttentionError, "positions"),
    "rotary-cos-only": (dict(cos_only=True), AttentionError, "rotary"),
    "bias-shape": (dict(bias=np.zeros((3, 1, 1, 1))), AttentionError, "bias"),
    "mask-dtype": (dict(mask=np.ones((1, 1, 1, 1))), TypeError, "mask"),
    "sinks-shape": (dict(sinks=np.zeros(3)), AttentionError, "sinks"),
    "unknown-backend": (dict(backend="tpu"), AttentionError, "backend"),
    "heads": (dict(q_heads=3), AttentionError, "num_heads"),
    "out-shape": (dict(out=np.empty((2, 1, H, 9), np.float32)), AttentionError, "out"),
}


@pytest.mark.parametrize("kind", ["contiguous", "paged-bs5"])
@pytest.mark.parametrize("bad", BAD_CALLS)
def test_failed_calls_leave_the_cache_unchanged(rng, kind, bad):
    tweak, exc, word = BAD_CALLS[bad]
    tweak = dict(tweak)
    cache, _, _ = filled(rng, kind, 2, [7, 3], 8, cap=10)
    snap = snapshot(cache)
    n_new = tweak.pop("n_new", 1)
    q = rng.standard_normal((2, 1, tweak.pop("q_heads", H), 8)).astype(
        tweak.pop("q_dtype", np.float32))
    kn = rng.standard_normal((2, n_new, HKV, 8)).astype(np.float32)
    vn = None if tweak.pop("v_none", False) else kn
    cos, sin = numba_attn.rotary_cos_sin(tweak.pop("rot_len", 16), 8)
    if tweak.pop("cos_only", False):
        sin = None
    with pytest.raises(exc, match=word):
        numba_attn.attention_with_kvcache(q, cache, kn, vn, rotary_cos=cos, rotary_sin=sin,
                                          causal=True, **tweak)
    for a, b in zip(snapshot(cache), snap):
        np.testing.assert_array_equal(a, b)


def test_bad_block_table_raises_and_leaves_the_cache_unchanged(rng):
    cache, _, _ = filled(rng, "paged-bs5", 2, [7, 3], 8, cap=10)
    cache.block_table[1, 0] = -3
    snap = snapshot(cache)
    q = rng.standard_normal((2, 1, H, 8)).astype(np.float32)
    kn = rng.standard_normal((2, 1, HKV, 8)).astype(np.float32)
    with pytest.raises(AttentionError, match="block_table"):
        numba_attn.attention_with_kvcache(q, cache, kn, kn)
    for a, b in zip(snapshot(cache), snap):
        np.testing.assert_array_equal(a, b)


def test_cache_type_is_checked():
    with pytest.raises(TypeError, match="cache"):
        numba_attn.attention_with_kvcache(np.zeros((1, 1, 2, 4), np.float32), object())


@pytest.mark.parametrize("sq", [1, 40], ids=["decode", "chunk"])
@pytest.mark.parametrize("kind", ["contiguous", "paged-bs5"])
def test_float16_storage_is_read_in_place(rng, kind, sq):
    """float16 caches are read by the kernels as bits (decode and BLAS paths alike), and
    agree with the float64 oracle on the float16 values."""
    cache, k, v = filled(rng, kind, 2, [50, 23], 16, dtype=np.float16, cap=60)
    q = rng.standard_normal((2, sq, H, 16)).astype(np.float16)
    got = numba_attn.attention_with_kvcache(q, cache, causal=True)
    assert got.dtype == np.float16
    for b, n in enumerate([50, 23]):
        exp = reference.attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True)
        np.testing.assert_allclose(got[b:b + 1].astype(np.float64), exp, rtol=3e-3, atol=3e-3)
