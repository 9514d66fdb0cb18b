"""One compiled kernel per dtype; thread-safety; results independent of the thread count."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest
from numerics import assert_close

import numba_attn as na
from numba_attn.cpu import forward as fk


def _qkv(rng, b=2, sq=33, sk=70, h=4, hkv=2, d=16, dtype=np.float32):
    return (rng.standard_normal((b, sq, h, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype))


def _strided_copy(x):
    """Same values as ``x`` in a non-contiguous view (every other element of a buffer)."""
    buf = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    buf[..., ::2] = x
    return buf[..., ::2]


def test_one_signature_per_dtype(rng):
    q, k, v = _qkv(rng)
    na.attention(q, k, v)  # make sure float32 is compiled
    before = len(fk.flash_forward.signatures)
    # fresh arrays, other shapes, every optional input, non-contiguous and Fortran order,
    # Python-float and numpy-float scale, decode and prefill paths: no new signature
    q2, k2, v2 = _qkv(rng, b=1, sq=1, sk=300, h=8, hkv=1, d=40)
    na.attention(q2, k2, v2)
    na.attention(q, k, v, scale=0.25, causal=True, window=(3, 2), softcap=1.0,
                 alibi_slopes=np.ones(4), bias=np.zeros((33, 70)),
                 mask=np.ones((2, 1, 1, 70), bool), kv_lens=np.array([5, 70]),
                 sinks=np.zeros(4))
    na.attention(q, k, v, scale=np.float64(0.3))
    qw = np.asfortranarray(q)
    kn = _strided_copy(k)
    assert not kn.flags.c_contiguous
    na.attention(qw, kn, v)
    na.attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16))
    assert len(fk.flash_forward.signatures) == before
    na.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert len(fk.flash_forward.signatures) <= before + 1


def test_noncontiguous_inputs_give_the_same_result(rng):
    q, k, v = _qkv(rng)
    kn = _strided_copy(k)
    np.testing.assert_array_equal(na.attention(np.asfortranarray(q), kn, v, causal=True),
                                  na.attention(q, k, v, causal=True))


def test_concurrent_python_threads_match_serial(rng):
    cases = [_qkv(rng, sq=sq, sk=sk) for sq, sk in [(1, 500), (40, 90), (130, 130), (7, 7)]]
    serial = [na.attention(q, k, v, causal=True) for q, k, v in cases]
    results = [None] * 8
    errors = []

    def work(i):
        try:
            q, k, v = cases[i % 4]
            for _ in range(5):
                results[i] = na.attention(q, k, v, causal=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(8):
        np.testing.assert_array_equal(results[i], serial[i % 4])


def test_call_during_another_parallel_region_does_not_abort():
    """A user's own prange kernel running in another thread while we attend (subprocess,
    so that an abort would fail this test instead of killing pytest)."""
    code = textwrap.dedent("""
        import threading, numpy as np, numba
        import numba_attn as na
        @numba.njit(parallel=True)
        def busy(a):
            s = 0.0
            for r in range(50):
                for i in numba.prange(a.size):
                    s += np.sin(a[i])
            return s
        a = np.ones(2_000_000)
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 64, 4, 32)).astype(np.float32)
        t = threading.Thread(target=busy, args=(a,)); t.start()
        for _ in range(20):
            out = na.attention(q, q, q, causal=True)
        t.join()
        print("ok", numba.threading_layer())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok" in res.stdout


@pytest.mark.parametrize("sq, sk", [(1, 2000), (200, 300)], ids=["decode-split", "prefill"])
def test_thread_count_does_not_change_results(rng, sq, sk):
    q, k, v = _qkv(rng, sq=sq, sk=sk)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = na.attention(q, k, v, causal=True)
    finally:
        numba.set_num_threads(n)
    many = na.attention(q, k, v, causal=True)
    assert_close(one, many, np.float32)


def _readonly(x):
    """``x``'s values in read-only memory, as np.frombuffer / np.load(mmap_mode='r') give."""
    y = np.frombuffer(x.tobytes(), dtype=x.dtype).reshape(x.shape)
    assert not y.flags.writeable
    return y


def test_read_only_inputs_compile_no_second_variant(rng):
    """Read-only q/k/v, tables, weights and caches' inputs: no new kernel signature."""
    from numba_attn.cpu import cache_ops, linear, norm, rope
    from numba_attn.cpu import decode as dk

    q, k, v = _qkv(rng)
    qd = q[:, :1].copy()
    cos, sin = na.rotary_cos_sin(80, 16)
    w = np.ones(16, np.float32)
    layer = na.MultiHeadAttention(64, 4, 2, rope_theta=1e4, seed=0)
    x1 = rng.standard_normal((1, 1, 64)).astype(np.float32)
    cache = na.KVCache(2, 80, num_kv_heads=2, head_dim=16)
    cache.append(k, v)

    def calls(ro):
        f = _readonly if ro else (lambda a: a)
        na.attention(f(q), f(k), f(v), causal=True)
        na.attention(f(qd), f(k), f(v))  # decode-sized
        na.apply_rotary(f(q), f(cos), f(sin))
        na.rms_norm(f(q), f(w))
        c = na.KVCache(2, 80, num_kv_heads=2, head_dim=16)
        na.attention_with_kvcache(f(qd), c, f(k[:, :1]), f(v[:, :1]), rotary_cos=f(cos),
                                  rotary_sin=f(sin), causal=True)
        layer.load_state_dict({n: f(a) for n, a in layer.state_dict().items()})
        layer(f(x1))

    kernels = (fk.flash_forward, dk.flash_decode, rope.rotary, cache_ops.append_rows,
               norm.rms_norm_rows, norm.rms_norm_rows_serial, linear.gemv)
    calls(False)
    before = [len(kern.signatures) for kern in kernels]
    calls(True)
    after = [len(kern.signatures) for kern in kernels]
    assert after == before, dict(zip([kk.__name__ for kk in kernels], zip(before, after)))
