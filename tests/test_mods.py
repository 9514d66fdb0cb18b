"""score_mod / mask_mod / block_mask (numba_attn.mods) on the CPU kernels.

Oracles: ``numba_attn.reference`` evaluating the same Python functions elementwise on the
full float64 score matrix; the built-in options (already tested against the reference)
re-expressed as mods; the built-in ``mask=`` array built from the mask_mod; a call without a
block mask (a block mask must change nothing but the work done).

Mods live at module level: each distinct function compiles its own kernel specialisation
(seconds), shared by the tests that use it.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from numerics import assert_close

import numba_attn
from numba_attn import AttentionError, BlockMask, KVCache, PagedKVCache, reference
from numba_attn.cpu import forward as fk
from numba_attn.mods import ModError

rng = np.random.default_rng(7)


def qkv(b, sq, sk, h=4, hkv=2, d=16, dt=np.float32):
    return (rng.standard_normal((b, sq, h, d)).astype(dt),
            rng.standard_normal((b, sk, hkv, d)).astype(dt),
            rng.standard_normal((b, sk, hkv, d)).astype(dt))


# ---------------------------------------------------------------------------------------
# the mods under test
# ---------------------------------------------------------------------------------------
@numba.njit
def t5_bucket(rel, n_buckets, max_distance):
    """T5's bidirectional relative-position bucket of ``rel = kv_idx - q_idx``."""
    half = n_buckets // 2
    ret = half if rel > 0 else 0
    n = abs(rel)
    exact = half // 2
    if n < exact:
        return ret + n
    v = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact))
    return ret + min(v, half - 1)


def t5_bias(score, b, h, i, j, table, max_distance):
    return score + table[h, t5_bucket(j - i, table.shape[1], max_distance)]


def alibi_mod(score, b, h, i, j, slopes, off):
    return score - slopes[h] * abs(i + off - j)


def tanh_cap(score, b, h, i, j, caps):
    return caps[h] * math.tanh(score / caps[h])


def bias_mod(score, b, h, i, j, bias):
    return score + bias[b, h, i, j]


def positional(b, h, i, j, off, left, right, lens):
    """causal / window / key padding as one mask_mod (left / right -1 = unbounded)."""
    p = i + off
    return (j < lens[b] and (left < 0 or j >= p - left) and (right < 0 or j <= p + right))


def document(b, h, i, j, doc_q, doc_k):
    return doc_q[b, i] == doc_k[b, j] and j <= i


def prefix_lm(b, h, i, j, prefix):
    return j <= i or j < prefix[b]


def dilated(b, h, i, j, step):
    return j <= i and (i - j) % step == 0


def longformer(b, h, i, j, w, n_global):
    return abs(i - j) <= w or i < n_global or j < n_global


def doc_ids(b, s, n_docs):
    """Sorted document ids (b, s) of n_docs random-length documents per row."""
    ids = np.zeros((b, s), np.int64)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), n_docs - 1, replace=False))
        ids[r] = np.searchsorted(cuts, np.arange(s), side="right")
    return ids


# ---------------------------------------------------------------------------------------
# custom mods equal the elementwise float64 reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_t5_relative_bias_matches_reference(dt):
    q, k, v = qkv(2, 37, 45, dt=dt)
    table = rng.standard_normal((4, 16))
    args = (table, 64)
    o, lse = numba_attn.attention(q, k, v, causal=True, score_mod=t5_bias, score_mod_args=args,
                                  return_lse=True)
    ro, rl = reference.attention(q, k, v, causal=True, score_mod=t5_bias, score_mod_args=args,
                                 return_lse=True)
    assert_close(o, ro, dt)
    assert_close(lse, rl, dt, "lse")


def test_per_head_tanh_cap_and_order_before_builtins():
    """score_mod runs on the scaled score, before softcap / ALiBi / bias."""
    q, k, v = qkv(1, 20, 30)
    q *= 4
    caps = np.array([1.0, 2.0, 5.0, 30.0])
    slopes = np.array([0.1, 0.2, 0.3, 0.4])
    bias = rng.standard_normal((1, 4, 20, 30))
    kw = dict(causal=True, softcap=3.0, alibi_slopes=slopes, bias=bias, score_mod=tanh_cap,
              score_mod_args=(caps,), return_lse=True)
    o, lse = numba_attn.attention(q, k, v, **kw)
    ro, rl = reference.attention(q, k, v, **kw)
    assert_close(o, ro, np.float32)
    assert_close(lse, rl, np.float32, "lse")


@pytest.mark.parametrize("name", ["document", "prefix_lm", "dilated", "longformer"])
def test_mask_mods_match_reference(name):
    b, s = 2, 70
    q, k, v = qkv(b, s, s)
    ids = doc_ids(b, s, 4)
    fn, args = {
        "document": (document, (ids, ids)),
        "prefix_lm": (prefix_lm, (np.array([5, 0], np.int64),)),
        "dilated": (dilated, (3,)),
        "longformer": (longformer, (6, 2)),
    }[name]
    o, lse = numba_attn.attention(q, k, v, mask_mod=fn, mask_mod_args=args, return_lse=True)
    ro, rl = reference.attention(q, k, v, mask_mod=fn, mask_mod_args=args, return_lse=True)
    assert_close(o, ro, np.float32)
    assert_close(lse, rl, np.float32, "lse")


def test_score_and_mask_mod_together_gqa_float64():
    q, k, v = qkv(2, 33, 33, h=6, hkv=2, dt=np.float64)
    table = rng.standard_normal((6, 16))
    ids = doc_ids(2, 33, 3)
    kw = dict(score_mod=t5_bias, score_mod_args=(table, 32), mask_mod=document,
              mask_mod_args=(ids, ids), return_lse=True)
    o, lse = numba_attn.attention(q, k, v, **kw)
    ro, rl = reference.attention(q, k, v, **kw)
    assert_close(o, ro, np.float64)
    assert_close(lse, rl, np.float64, "lse")


# ---------------------------------------------------------------------------------------
# built-in options re-expressed as mods equal the built-in options
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_alibi_and_bias_as_score_mods_equal_builtins(dt):
    q, k, v = qkv(2, 25, 40, dt=dt)
    slopes = rng.uniform(0.05, 0.5, 4)
    want = numba_attn.attention(q, k, v, causal=True, alibi_slopes=slopes)
    got = numba_attn.attention(q, k, v, causal=True, score_mod=alibi_mod,
                               score_mod_args=(slopes.astype(dt), 40 - 25))
    assert_close(got, want, dt)
    if dt == np.float32:
        bias = rng.standard_normal((2, 4, 25, 40)).astype(np.float32)
        want = numba_attn.attention(q, k, v, bias=bias)
        got = numba_attn.attention(q, k, v, score_mod=bias_mod, score_mod_args=(bias,))
        assert_close(got, want, dt)


def test_softcap_as_score_mod_equals_builtin():
    q, k, v = qkv(1, 30, 30)
    q *= 3
    want = numba_attn.attention(q, k, v, causal=True, softcap=2.5)
    got = numba_attn.attention(q, k, v, causal=True, score_mod=tanh_cap,
                               score_mod_args=(np.full(4, 2.5),))
    np.testing.assert_allclose(got, want, atol=3e-6, rtol=3e-6)  # vector tanh vs math.tanh


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("opts", [
    dict(causal=True), dict(window=(5, 2)), dict(causal=True, window=(7, 0)),
    dict(kv_lens=[0, 33]), dict(causal=True, kv_lens=[12, 0])])
def test_positional_mask_mod_equals_builtins(dt, opts):
    """causal, windows and key padding (with empty rows: out 0, lse -inf) as a mask_mod."""
    sq, sk = 21, 40
    q, k, v = qkv(2, sq, sk, dt=dt)
    off = sk - sq
    left, right = opts.get("window", (-1, -1))
    if opts.get("causal"):
        right = 0 if right < 0 else min(right, 0)
    lens = np.array(opts.get("kv_lens", [sk, sk]), np.int64)
    o, lse = numba_attn.attention(q, k, v, return_lse=True, **opts)
    got, glse = numba_attn.attention(q, k, v, mask_mod=positional,
                                     mask_mod_args=(off, left, right, lens), return_lse=True)
    assert_close(got, o, dt)
    assert_close(glse, lse, dt, "lse")
    if "kv_lens" in opts:
        empty = lens == 0
        assert (glse[empty] == -np.inf).all() and (got[empty] == 0).all()


def test_mask_mod_combines_with_mask_array_and_sinks():
    q, k, v = qkv(2, 18, 18)
    mask = rng.random((2, 1, 18, 18)) < 0.7
    sinks = rng.standard_normal(4)
    ids = doc_ids(2, 18, 3)
    kw = dict(mask=mask, sinks=sinks, mask_mod=document, mask_mod_args=(ids, ids),
              return_lse=True)
    o, lse = numba_attn.attention(q, k, v, **kw)
    ro, rl = reference.attention(q, k, v, **kw)
    assert_close(o, ro, np.float32)
    assert_close(lse, rl, np.float32, "lse")


# ---------------------------------------------------------------------------------------
# block masks
# ---------------------------------------------------------------------------------------
def dense_mask(fn, args, b, h, sq, sk):
    return np.array([[[[fn(bb, hh, i, j, *args) for j in range(sk)] for i in range(sq)]
                      for hh in range(h)] for bb in range(b)], bool)


def test_create_block_mask_flags_match_dense_evaluation():
    b, s = 2, 300
    ids = doc_ids(b, s, 5)
    bm = numba_attn.create_block_mask(document, b, 1, s, s - 7, mask_mod_args=(ids, ids),
                                      block_size=(32, 64))
    dense = dense_mask(document, (ids, ids), b, 1, s, s - 7)
    nqb, nkb = -(-s // 32), -(-(s - 7) // 64)
    assert bm.flags.shape == (b, 1, nqb, nkb)
    for bb in range(b):
        for qb in range(nqb):
            for kb in range(nkb):
                blk = dense[bb, 0, qb * 32:(qb + 1) * 32, kb * 64:(kb + 1) * 64]
                want = 2 if blk.all() else (1 if blk.any() else 0)
                assert bm.flags[bb, 0, qb, kb] == want
    assert 0 < bm.sparsity < 1


@pytest.mark.parametrize("fn,args", [(document, None), (longformer, (40, 3))])
def test_block_mask_equals_no_block_mask_and_dense_mask(fn, args):
    """Tiles are skipped (S > the 256-key tile) with results identical to no block mask."""
    b, s = 2, 600
    q, k, v = qkv(b, s, s, h=2, hkv=1)
    if args is None:
        ids = doc_ids(b, s, 4)
        args = (ids, ids)
    bm = numba_attn.create_block_mask(fn, b, 1, s, s, mask_mod_args=args)
    assert bm.sparsity > 0.1
    o, lse = numba_attn.attention(q, k, v, block_mask=bm, return_lse=True)
    o2, lse2 = numba_attn.attention(q, k, v, mask_mod=fn, mask_mod_args=args, return_lse=True)
    np.testing.assert_array_equal(o, o2)
    np.testing.assert_array_equal(lse, lse2)
    dense = dense_mask(fn, args, b, 1, s, s)
    o3, lse3 = numba_attn.attention(q, k, v, mask=dense, return_lse=True)
    assert_close(o, o3, np.float32)
    assert_close(lse, lse3, np.float32, "lse")


def test_block_mask_flags_are_honoured():
    """Full blocks never call mask_mod, empty blocks are skipped (flags forced by hand)."""
    q, k, v = qkv(1, 40, 40)
    ids = doc_ids(1, 40, 3)
    bm = numba_attn.create_block_mask(document, 1, 1, 40, 40, mask_mod_args=(ids, ids),
                                      block_size=16)
    full = BlockMask(np.full_like(bm.flags, 2), bm.block_size, 40, 40, document, (ids, ids))
    assert_close(numba_attn.attention(q, k, v, block_mask=full),
                 reference.attention(q, k, v), np.float32)
    empty = BlockMask(np.zeros_like(bm.flags), bm.block_size, 40, 40, document, (ids, ids))
    o, lse = numba_attn.attention(q, k, v, block_mask=empty, return_lse=True)
    assert (o == 0).all() and (lse == -np.inf).all()


def test_block_mask_broadcast_heads_batch_and_per_head_flags():
    q, k, v = qkv(2, 50, 50)

    def per_head(b, h, i, j, w):
        return abs(i - j) <= w[h]
    w = np.array([0, 3, 10, 100], np.int64)
    bm = numba_attn.create_block_mask(per_head, 1, 4, 50, 50, mask_mod_args=(w,),
                                      block_size=16)
    assert bm.flags.shape == (1, 4, 4, 4)
    o = numba_attn.attention(q, k, v, block_mask=bm)
    assert_close(o, reference.attention(q, k, v, mask_mod=per_head, mask_mod_args=(w,)),
                 np.float32)


# ---------------------------------------------------------------------------------------
# varlen and caches
# ---------------------------------------------------------------------------------------
def test_varlen_mods_use_in_segment_positions():
    lq = [5, 0, 30, 17]
    lk = [9, 4, 30, 17]
    cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    q = rng.standard_normal((cq[-1], 4, 16)).astype(np.float32)
    k = rng.standard_normal((ck[-1], 2, 16)).astype(np.float32)
    v = rng.standard_normal((ck[-1], 2, 16)).astype(np.float32)
    table = rng.standard_normal((4, 16))
    prefix = np.array([2, 0, 6, 0], np.int64)
    kw = dict(score_mod=t5_bias, score_mod_args=(table, 64), mask_mod=prefix_lm,
              mask_mod_args=(prefix,), return_lse=True)
    o, lse = numba_attn.attention_varlen(q, k, v, cq, ck, **kw)
    ro, rl = reference.attention_varlen(q, k, v, cq, ck, **kw)
    assert_close(o, ro, np.float32)
    assert_close(lse, rl, np.float32, "lse")
    bm = numba_attn.create_block_mask(prefix_lm, 4, 1, 30, 30, mask_mod_args=(prefix,),
                                      block_size=8)
    o2 = numba_attn.attention_varlen(q, k, v, cq, ck, score_mod=t5_bias,
                                     score_mod_args=(table, 64), block_mask=bm)
    np.testing.assert_array_equal(o2, o)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_mods_equal_reference_backend(paged):
    b, cap, d = 2, 48, 16

    def make():
        if paged:
            return PagedKVCache(b, 2 * 7, 7, 2, d, np.float32, max_seqlen=cap)
        return KVCache(b, cap, 2, d, dtype=np.float32)
    caches = [make(), make(), make()]
    table = rng.standard_normal((4, 16))
    ids = doc_ids(b, cap, 4)
    kw = dict(causal=True, score_mod=t5_bias, score_mod_args=(table, 64), mask_mod=document,
              mask_mod_args=(ids, ids), return_lse=True)
    bm = numba_attn.create_block_mask(document, b, 1, 20, cap, mask_mod_args=(ids, ids),
                                      block_size=(4, 8))
    for n_new in (20, 1, 3):  # prefill, decode, short chunk
        q = rng.standard_normal((b, n_new, 4, d)).astype(np.float32)
        kn = rng.standard_normal((b, n_new, 2, d)).astype(np.float32)
        vn = rng.standard_normal((b, n_new, 2, d)).astype(np.float32)
        o, lse = numba_attn.attention_with_kvcache(q, caches[0], kn, vn, **kw)
        ro, rl = numba_attn.attention_with_kvcache(q, caches[1], kn, vn, backend="reference",
                                                   **kw)
        assert_close(o, ro, np.float32)
        assert_close(lse, rl, np.float32, "lse")
        if paged:  # the same step with the block mask, on a third cache kept in step
            bo = numba_attn.attention_with_kvcache(q, caches[2], kn, vn, causal=True,
                                                   score_mod=t5_bias,
                                                   score_mod_args=(table, 64), block_mask=bm)
            np.testing.assert_array_equal(bo, o)


# ---------------------------------------------------------------------------------------
# compile once; errors before anything runs
# ---------------------------------------------------------------------------------------
def _n_compiled():
    return sum(len(d.signatures) for _, d in fk.flash_forward_mods.variants())


def test_new_table_contents_and_njit_mods_compile_nothing():
    q, k, v = qkv(1, 16, 16)
    table = rng.standard_normal((4, 16))
    numba_attn.attention(q, k, v, score_mod=t5_bias, score_mod_args=(table, 64))
    n_kernel = _n_compiled()
    o1 = numba_attn.attention(q, k, v, score_mod=t5_bias, score_mod_args=(table * 0, 64))
    o2 = numba_attn.attention(q, k, v, score_mod=t5_bias, score_mod_args=(table + 1.0, 99))
    assert _n_compiled() == n_kernel
    assert_close(o1, reference.attention(q, k, v), np.float32)  # a zero table: no bias
    assert_close(o2, reference.attention(q, k, v, score_mod=t5_bias,
                                         score_mod_args=(table + 1.0, 99)), np.float32)
    numba_attn.attention(q, k, v)  # the default path never touches the mod kernel
    assert _n_compiled() == n_kernel


def test_errors_before_anything_runs():
    q, k, v = qkv(1, 8, 8)

    def two_args(score, b):
        return score

    def bad_body(score, b, h, i, j):
        return score + "x"

    def returns_bool(score, b, h, i, j):
        return score > 0

    def returns_float(b, h, i, j):
        return 1.5

    with pytest.raises(ModError, match=r"score_mod: .*two_args.* cannot take 5 positional"):
        numba_attn.attention(q, k, v, score_mod=two_args)
    with pytest.raises(ModError, match=r"(?s)score_mod: .*bad_body does not compile .*"
                                       r"float32, int64, int64, int64, int64.*"):
        numba_attn.attention(q, k, v, score_mod=bad_body)
    with pytest.raises(ModError, match="returns bool.*expected a float"):
        numba_attn.attention(q, k, v, score_mod=returns_bool)
    with pytest.raises(ModError, match="mask_mod: .*returns float64.*expected a bool"):
        numba_attn.attention(q, k, v, mask_mod=returns_float)
    with pytest.raises(ModError, match=r"cannot take 6 positional"):  # 4 + 2 args given
        numba_attn.attention(q, k, v, mask_mod=dilated, mask_mod_args=(1, 2))
    with pytest.raises(ModError, match=r"mask_mod_args\[0\]: object"):
        numba_attn.attention(q, k, v, mask_mod=dilated, mask_mod_args=(object(),))
    with pytest.raises(ModError, match="mask_mod_args: expected a tuple"):
        numba_attn.attention(q, k, v, mask_mod=dilated, mask_mod_args=3)
    with pytest.raises(ModError, match="score_mod: expected a Python function"):
        numba_attn.attention(q, k, v, score_mod=abs)
    with pytest.raises(AttentionError, match="score_mod_args: given without"):
        numba_attn.attention(q, k, v, score_mod_args=(1,))
    with pytest.raises(ModError, match="score_mod_args: expected a tuple"):
        numba_attn.attention(q, k, v, score_mod=t5_bias, score_mod_args=np.zeros(3))
    ids = np.zeros((1, 8), np.int64)
    bm = numba_attn.create_block_mask(document, 1, 1, 8, 8, mask_mod_args=(ids, ids))
    with pytest.raises(AttentionError, match="block_mask: built for seqlen_q=8"):
        numba_attn.attention(*qkv(1, 9, 9), block_mask=bm)
    bm2 = numba_attn.create_block_mask(document, 2, 1, 8, 8, mask_mod_args=(ids, ids))
    with pytest.raises(AttentionError, match="block_mask: built for batch=2"):
        numba_attn.attention(*qkv(3, 8, 8), block_mask=bm2)
    with pytest.raises(AttentionError, match="mask_mod: differs"):
        numba_attn.attention(q, k, v, block_mask=bm, mask_mod=dilated)
    with pytest.raises(AttentionError, match="block_mask: expected a BlockMask"):
        numba_attn.attention(q, k, v, block_mask=np.ones((1, 1, 1, 1)))
    with pytest.raises(AttentionError, match="block_size"):
        numba_attn.create_block_mask(document, 1, 1, 8, 8, mask_mod_args=(ids, ids),
                                     block_size=(8, 8, 8))


def test_failed_mod_leaves_the_cache_unchanged():
    cache = KVCache(1, 16, 2, 16, dtype=np.float32)
    q, k, v = qkv(1, 3, 3)

    def bad(b, h, i, j):
        return i.nope

    k0 = cache.k.copy()
    with pytest.raises(ModError, match="does not compile"):
        numba_attn.attention_with_kvcache(q, cache, k, v, mask_mod=bad)
    assert cache.seqlens.tolist() == [0]
    np.testing.assert_array_equal(cache.k, k0)


@pytest.mark.parametrize("which", ["mask_mod", "score_mod"])
def test_dropout_forward_keeps_the_mods(which):
    """The dropout forward recomputed probabilities without the mods (wrong output, off by
    ~3 on this case); its kernel now applies them like the fused forward."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, n, 2, 8)) for n in (6, 9, 9))
    kw = {"mask_mod": lambda b, h, i, j: (i + j) % 3 != 0} if which == "mask_mod" else {
        "score_mod": lambda s, b, h, i, j: s * 0.5 + 0.1 * (i - j)}
    got = numba_attn.attention(q, k, v, dropout_p=0.3, seed=5, **kw)
    want = reference.attention(q, k, v, dropout_p=0.3, seed=5, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
