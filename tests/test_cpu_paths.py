"""CPU kernel paths against the reference: every head-dim tail, every storage dtype,
contiguous and paged caches, and the AVX2 / generic lowerings forced in a child process.

The fused forward (many query rows) and the decode kernel (few) are both exercised; head
dims 1 .. 576 hit every vector tail, sequence lengths are not tile multiples.
"""
from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import numba_attn
from numba_attn import KVCache, PagedKVCache

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from numerics import assert_close  # noqa: E402

HEAD_DIMS = [1, 3, 17, 40, 59, 64, 80, 128, 129, 256, 576]
BF16 = np.dtype(ml_dtypes.bfloat16)
STORAGE = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
           "bfloat16": BF16}


def _tol_dtype(dt):
    """Tolerance class of an output dtype (bfloat16 output: float16's is too tight)."""
    return np.float16 if np.dtype(dt).itemsize == 2 else dt


def naive_error(q, k, v, causal):
    """Max error of plain float32 numpy attention against float64: the yardstick of the
    kernel's own error (FlashAttention's tests bound it by twice this)."""
    def run(dt):
        qq, kk, vv = (x.astype(dt).transpose(0, 2, 1, 3) for x in (q, k, v))
        rep = qq.shape[1] // kk.shape[1]
        kk, vv = np.repeat(kk, rep, 1), np.repeat(vv, rep, 1)
        s = qq @ kk.transpose(0, 1, 3, 2) / dt(np.sqrt(q.shape[-1]))
        if causal:
            sq, sk = s.shape[-2:]
            s = np.where(np.arange(sk)[None] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        return (s @ vv).transpose(0, 2, 1, 3)
    return float(np.nanmax(np.abs(run(np.float32).astype(np.float64) - run(np.float64))))


def check_forward(rng, d, dv, sq, sk, h, hkv, storage, causal, **opts):
    dt = STORAGE[storage]
    q = rng.standard_normal((2, sq, h, d)).astype(dt)
    k = rng.standard_normal((2, sk, hkv, d)).astype(dt)
    v = rng.standard_normal((2, sk, hkv, dv)).astype(dt)
    got, lse = numba_attn.attention(q, k, v, causal=causal, return_lse=True, backend="cpu",
                                    **opts)
    exp, else_ = numba_attn.attention(q, k, v, causal=causal, return_lse=True,
                                      backend="reference", **opts)
    assert got.dtype == np.dtype(dt)
    assert_close(got, exp, _tol_dtype(dt))
    assert_close(lse, else_, _tol_dtype(dt), "lse")
    if storage == "float32" and not opts:  # the twice-naive-error bound
        bound = 2 * naive_error(q, k, v, causal) + 1e-6
        err = np.abs(got.astype(np.float64) - exp).max()
        assert err <= bound, f"error {err:.2e} above twice the naive float32 error {bound:.2e}"


def cache_of(kind, batch, cap, hkv, d, dt):
    if kind == "contiguous":
        return KVCache(batch, cap, hkv, d, dtype=dt)
    bs = int(kind.split("-")[1])
    return PagedKVCache(batch, batch * -(-cap // bs), bs, hkv, d, dt, max_seqlen=cap)


def check_cache(rng, kind, storage, d, sq, lens, q_float32=True):
    """Rows of ``lens`` keys in a cache, then sq new tokens appended and attended causally
    (the fused forward for sq * group > 8, decode otherwise); float32 q and new tokens
    over a half cache when q_float32."""
    dt = STORAGE[storage]
    h, hkv, batch = 4, 2, len(lens)
    cap = max(lens) + sq
    cache = cache_of(kind, batch, cap, hkv, d, dt)
    k_all = rng.standard_normal((batch, max(lens), hkv, d)).astype(dt)
    v_all = rng.standard_normal((batch, max(lens), hkv, d)).astype(dt)
    cache.append(k_all, v_all)
    cache.seqlens = lens
    qdt = np.float32 if (q_float32 and np.dtype(dt).itemsize == 2) else dt
    q = rng.standard_normal((batch, sq, h, d)).astype(qdt)
    kn = rng.standard_normal((batch, sq, hkv, d)).astype(qdt)
    vn = rng.standard_normal((batch, sq, hkv, d)).astype(qdt)
    got = numba_attn.attention_with_kvcache(q, cache, kn, vn, causal=True, backend="cpu")
    assert got.dtype == np.dtype(qdt)
    for b in range(batch):  # each row alone, from its keys, through the reference backend
        n = lens[b]
        kk = np.concatenate([k_all[b, :n], kn[b].astype(dt)]).astype(np.float64)
        vv = np.concatenate([v_all[b, :n], vn[b].astype(dt)]).astype(np.float64)
        exp = numba_attn.attention(q[b:b + 1].astype(np.float64), kk[None], vv[None],
                                   causal=True, backend="reference")
        assert_close(got[b:b + 1], exp, _tol_dtype(qdt))


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_fused_forward_every_head_dim(rng, d):
    check_forward(rng, d, d, 70, 97, 4, 2, "float32", causal=True)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_decode_every_head_dim(rng, d):
    check_forward(rng, d, d, 1, 1300, 4, 1, "float32", causal=False)


@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize("shape", ["prefill", "decode"])
def test_storage_dtypes(rng, storage, shape):
    sq = 33 if shape == "prefill" else 2
    check_forward(rng, 80, 72, sq, 300, 6, 2, storage, causal=True, window=(150, 3))


@pytest.mark.parametrize("storage", list(STORAGE))
def test_storage_dtypes_every_option(rng, storage):
    h, sq, sk = 4, 21, 45
    check_forward(rng, 40, 40, sq, sk, h, 2, storage, causal="top_left", softcap=4.0,
                  alibi_slopes=np.linspace(0.1, 0.5, h),
                  bias=rng.standard_normal((sq, sk)), mask=rng.random((2, 1, sq, sk)) > 0.2,
                  sinks=rng.standard_normal(h), scale=0.3)


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("kind", ["contiguous", "paged-1", "paged-16", "paged-17"])
@pytest.mark.parametrize("sq", [1, 9])
def test_caches(rng, kind, storage, sq):
    check_cache(rng, kind, storage, 59 if sq == 1 else 64, sq, [40, 77])


def test_float32_q_needs_host_half_cache():
    cache = KVCache(1, 8, 1, 4, dtype=np.float64)
    with pytest.raises(TypeError, match="q: dtype float32 differs"):
        numba_attn.attention_with_kvcache(np.zeros((1, 1, 1, 4), np.float32), cache)


FORCED = """
import sys, numpy as np
sys.path.insert(0, {here!r})
from numba_attn.cpu import simd
assert simd.ISA == {isa!r}, simd.ISA
import test_simd
test_simd.test_every_half_bit_pattern(None)
import test_cpu_paths as t
rng = np.random.default_rng(5)
for d in (1, 17, 40, 64, 129):
    t.check_forward(rng, d, d, 37, 90, 4, 2, "float32", causal=True)
    t.check_forward(rng, d, d, 1, 700, 4, 1, "float32", causal=False)
for storage in ("float64", "float16", "bfloat16"):
    t.check_forward(rng, 33, 33, 19, 60, 4, 2, storage, causal=True, softcap=3.0)
    t.check_forward(rng, 33, 33, 1, 600, 4, 2, storage, causal=False)
t.check_cache(rng, "paged-17", "float16", 48, 1, [30, 50])
t.check_cache(rng, "paged-16", "bfloat16", 48, 9, [30, 50])
print("ok")
"""

TARGETS = {
    # Haswell: AVX2 + FMA + F16C (256-bit vectors, 16 registers: 6-row micro-kernels)
    "avx2": ("haswell", "+64bit,+avx,+avx2,+fma,+f16c,+sse,+sse2,+sse3,+ssse3,+sse4.1,"
             "+sse4.2,+popcnt,+cx16,+bmi,+bmi2,+lzcnt,+movbe"),
    # baseline x86-64: SSE2 only (what LLVM lowers the same IR to on any other ISA)
    "generic": ("x86-64", "+64bit,+sse,+sse2"),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("isa", list(TARGETS))
def test_forced_lowering(isa, tmp_path):
    """The AVX2 and generic code paths, on this machine, in a child with a fresh cache
    (Numba's cache keys on the kernel's own file, not on simd.py: never reuse one)."""
    name, feats = TARGETS[isa]
    env = dict(os.environ, NUMBA_CPU_NAME=name, NUMBA_CPU_FEATURES=feats,
               NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", FORCED.format(here=HERE, isa=isa)], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout + r.stderr)[-3000:]
