"""Regressions of the backward's wrong-gradient and crash classes (issue 17, part 1).

Root cause, shared by every class below: the tiled dq, dk/dv and dropout-forward kernels
(numba_attn/cpu/backward.py) handed the tile fix-up a zero-offset scratch sized for the
item's lanes as the offsets of the *other* tile too (64 keys in the dq pass, 64 queries in
the dk/dv pass). When the lanes were fewer than that tile (few queries against many keys
for dq; few keys against many queries for dk/dv), the fix-up read past the scratch: the
garbage offsets masked or unmasked scores at random (wrong gradients, different from run
to run) or reached unmapped memory (segfault / bus error).

Each case runs in a child process (tests/property_cases.py --case), so a crash is a
failing test that names the configuration.
"""
from __future__ import annotations

import json

import property_cases as pc
import pytest

_BASE = dict(B=1, H=1, Hkv=1, D=32, Dv=32, dtype="float32", causal=False, window=(-1, -1),
             softcap=0.0, scale=None, alibi=None, bias=None, mask=None, kv_lens=False,
             sinks=False, seed=17, dropout_p=0.0)


def _case(**kw):
    return json.dumps({**_BASE, **kw})


CASES = {
    # dq off by 0.29 (absolute): few queries against a long causal key range
    "dq_short_q_long_k_causal": [
        _case(Sq=5, Sk=121, causal=True),
        _case(Sq=5, Sk=121, causal=True, dtype="float64"),
        _case(Sq=1, Sk=200, D=64, Dv=64),
    ],
    # dk wrong with kv_lens (relative 0.66)
    "dk_kv_lens": [
        _case(B=2, Sq=33, Sk=33, H=4, Hkv=1, D=80, Dv=80, dtype="float64", softcap=30.0,
              causal=True, kv_lens=[7, 11]),
    ],
    # dk wrong with a boolean mask and many queries over two keys (0.61)
    "dk_mask_long_q_short_k": [
        _case(Sq=257, Sk=2, H=8, Hkv=2, D=80, Dv=80, mask="bhqk"),
        _case(Sq=257, Sk=2, H=8, Hkv=2, D=80, Dv=80, mask="bhqk", dtype="float64"),
    ],
    # dk wrong with ALiBi (0.41)
    "dk_alibi": [
        _case(Sq=33, Sk=13, D=16, Dv=16, dtype="float64", alibi="h"),
    ],
    # segfault: float64 bias (1, H, Sq, Sk) with return_dbias
    "crash_f64_bias_dbias": [
        _case(B=1, H=4, Hkv=4, Sq=33, Sk=16, D=64, Dv=64, dtype="float64", bias="1hqk"),
        _case(B=1, H=4, Hkv=4, Sq=16, Sk=32, D=80, Dv=80, dtype="float64", bias="1hqk"),
    ],
    # found by tests/property_cases.py on the old code: one key against many queries
    "dv_one_key_dropout": [
        _case(B=3, Sq=47, Sk=1, H=12, Hkv=3, D=24, Dv=24, dtype="float64", bias="bhqk",
              kv_lens=True, softcap=0.5, dropout_p=0.2, seed=104075, sinks=True),
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_matches_reference(name):
    args = []
    for c in CASES[name]:
        args += ["--case", c]
    rc, text = pc.spawn("backward", *args, timeout=600)
    assert rc == 0, pc.report(rc, text)
