"""One dtype rule: q, k, v of attention share a dtype; mixed precision (float32 q and
float32 new tokens over float16 / bfloat16 storage) is a host cache's. Oracle:
numba_attn.reference in float64 on the keys the cache actually stores."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn
from numba_attn import reference


@pytest.mark.parametrize("qdt, kdt", [(np.float32, np.float16), (np.float16, np.float32),
                                      (np.float64, np.float32)])
def test_attention_refuses_mixed_dtypes_naming_the_argument_and_the_cache_rule(qdt, kdt):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 2, 8)).astype(qdt)
    k = rng.standard_normal((1, 4, 2, 8)).astype(kdt)
    with pytest.raises(TypeError, match=r"^k: dtype .* differs from q's .*KVCache"):
        numba_attn.attention(q, k, k.astype(qdt))


def test_float32_tokens_over_a_float16_cache_are_rounded_and_attended_in_float32():
    rng = np.random.default_rng(2)
    cache = numba_attn.KVCache(2, 32, 2, 16, dtype=np.float16)
    kp, vp = (rng.standard_normal((2, 10, 2, 16)).astype(np.float32) for _ in range(2))
    cache.append(kp, vp)  # float32 into float16 storage: rounded, as documented
    np.testing.assert_array_equal(cache.k[:, :10], kp.astype(np.float16))
    q = rng.standard_normal((2, 1, 4, 16)).astype(np.float32)
    kn, vn = (rng.standard_normal((2, 1, 2, 16)).astype(np.float32) for _ in range(2))
    o = numba_attn.attention_with_kvcache(q, cache, kn, vn)
    assert o.dtype == np.float32
    ks = np.concatenate([kp, kn], axis=1).astype(np.float16).astype(np.float64)
    vs = np.concatenate([vp, vn], axis=1).astype(np.float16).astype(np.float64)
    ref = reference.attention(q.astype(np.float64), ks, vs)
    np.testing.assert_allclose(o, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dt", [np.float64, np.float16])
def test_a_cache_refuses_other_widths_before_writing(dt):
    cache = numba_attn.KVCache(1, 8, 1, 4, dtype=np.float16 if dt == np.float64
                               else np.float32)
    x = np.ones((1, 2, 1, 4), dt)
    with pytest.raises(TypeError, match=r"^k_new: dtype .* differs from the cache's"):
        cache.append(x, x)
    assert int(cache.seqlens[0]) == 0 and not cache.k.any()
