"""The positional visibility helpers of numba_attn/masking.py (shared by the forward and
backward, CPU and CUDA) against the rule stated elementwise, as reference.py states it."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from numba_attn import masking

key_range = masking.key_range
query_range = masking.make_query_range(key_range)


def visible(i, j, off, klen, causal, wl, wr):
    """DESIGN.md's rule for one (query, key) pair; query i sits at key position i + off."""
    ok = 0 <= j < klen
    if causal == masking.CAUSAL_BOTTOM_RIGHT:
        ok = ok and j <= i + off
    elif causal == masking.CAUSAL_TOP_LEFT:
        ok = ok and j <= i
    if wl >= 0:
        ok = ok and j >= i + off - wl
    if wr >= 0:
        ok = ok and j <= i + off + wr
    return ok


rows = st.tuples(st.integers(0, 40), st.integers(0, 40)).flatmap(
    lambda qk: st.tuples(st.just(qk[0]), st.just(qk[1]), st.integers(0, qk[1]),
                         st.integers(-qk[0] - 3, qk[1] + 3), st.sampled_from([0, 1, 2]),
                         st.integers(-1, 12), st.integers(-1, 12)))


@settings(max_examples=300, deadline=None)
@given(rows)
def test_key_range_is_each_querys_visible_keys(row):
    lq, lk, klen, off, causal, wl, wr = row
    for i in range(lq):
        lo, hi = key_range(i, i + 1, off, klen, causal, wl, wr)
        got = {j for j in range(max(lo, 0), min(hi, lk))}
        want = {j for j in range(lk) if visible(i, j, off, klen, causal, wl, wr)}
        assert got == want, (i, lo, hi)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_query_range_is_the_inverse_of_key_range(row):
    lq, lk, klen, off, causal, wl, wr = row
    for j in range(lk):
        ilo, ihi = query_range(j, lq, off, klen, causal, wl, wr)
        got = set(range(ilo, ihi))
        want = {i for i in range(lq) if visible(i, j, off, klen, causal, wl, wr)}
        assert got == want, (j, ilo, ihi)


@settings(max_examples=300, deadline=None)
@given(rows, st.integers(0, 40), st.integers(1, 9), st.integers(0, 40), st.integers(1, 9))
def test_tile_needs_mask_false_only_when_every_pair_is_visible(row, i0, ni, j0, nj):
    lq, lk, klen, off, causal, wl, wr = row
    i1, j1 = i0 + ni, j0 + nj
    if not masking.tile_needs_mask(i0, i1, j0, j1, off, causal, wl, wr):
        for i in range(i0, i1):
            for j in range(j0, j1):
                assert visible(i, j, off, 10**9, causal, wl, wr), (i, j)
