"""numpy's OpenBLAS workers stopped before a parallel kernel (numba_attn/_blas_quiet.py).

Nothing here times anything: the tests check that the shutdown finds numpy's OpenBLAS,
that numpy's BLAS keeps giving the same results afterwards (its workers restart on
demand), and that attention after a matmul is unchanged.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import numba_attn
from numba_attn import _blas_quiet

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


@linux
def test_finds_numpys_openblas():
    np.ones((64, 64)) @ np.ones((64, 64))
    _blas_quiet.quiet()
    config = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
    blas = str(config.get("Build Dependencies", {}).get("blas", {}).get("name", ""))
    if "openblas" not in blas.lower():
        pytest.skip(f"numpy's BLAS is {blas!r}, not OpenBLAS")
    assert len(_blas_quiet._state["fns"]) >= 1


def test_numpy_blas_results_survive_a_shutdown(rng):
    a = rng.standard_normal((300, 300))
    before = a @ a
    for _ in range(3):
        _blas_quiet.quiet()
        np.testing.assert_array_equal(a @ a, before)  # workers restarted, same result


def test_attention_after_matmul_equals_attention_alone(rng):
    q = rng.standard_normal((1, 1, 8, 64)).astype(np.float32)
    cache = numba_attn.KVCache(1, 4096, 2, 64)
    kv = rng.standard_normal((1, 4096, 2, 64)).astype(np.float32)
    cache.append(kv, kv)
    alone = numba_attn.attention_with_kvcache(q, cache)
    m = rng.standard_normal((512, 512)).astype(np.float32)
    m @ m
    np.testing.assert_array_equal(numba_attn.attention_with_kvcache(q, cache), alone)


def test_can_be_switched_off():
    code = ("import numpy as np, numba_attn\nfrom numba_attn import _blas_quiet as b\n"
            "np.ones((64, 64)) @ np.ones((64, 64)); b.quiet(); print(b._state['modules'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**__import__("os").environ, "NUMBA_ATTN_QUIET_BLAS": "0"},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "-1"  # never scanned: nothing was called
