"""``q_offset`` on the CUDA kernels (forward and split decode) against numba_attn.reference."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn
from numba_attn import reference


@pytest.mark.parametrize("sq, offset, tune", [(5, -3, {}), (5, 4, {}), (1, 9, dict(nsplit=3))],
                         ids=["negative", "positive", "decode-split"])
def test_q_offset_matches_reference(rng, tuned, sq, offset, tune):
    q = rng.standard_normal((2, sq, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 13, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 13, 2, 8)).astype(np.float32)
    opts = dict(causal=True, window=(6, -1), alibi_slopes=rng.uniform(0.1, 1.0, 4),
                q_offset=offset)
    expected, expected_lse = reference.attention(q, k, v, return_lse=True, **opts)
    with tuned(**tune):
        got, lse = numba_attn.attention(q, k, v, return_lse=True, backend="cuda", **opts)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    fin = np.isfinite(expected_lse)
    assert np.array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(lse[fin], expected_lse[fin], rtol=2e-5, atol=2e-5)
