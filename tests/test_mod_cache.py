"""A user's score_mod / mask_mod compiled once per machine (numba_attn._modcache).

Oracle: numba_attn.reference evaluating the same Python functions on the float64 score
matrix, in the same child process that ran the kernel; the cache is judged by Numba's own
hit / miss counters of the variant dispatcher (a hit must give the reference's answer, an
edit must miss). Children get a fresh ``NUMBA_ATTN_CACHE_DIR`` (tmp_path) and share the
caller's Numba cache for numba_attn's own kernels.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from numba_attn import _modcache as mc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    t0 = time.perf_counter()
    import numba_attn
    from numba_attn import reference
    from numba_attn.cpu import forward as fk
    sys.path.insert(0, sys.argv[1])
    import usermods
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 37, 4, 16), dtype=np.float32) for _ in range(3))
    tab = rng.standard_normal(64)
    numba_attn.attention(q, k, v)   # numba_attn's own kernel first: not what is timed
    t1 = time.perf_counter()
    o = numba_attn.attention(q, k, v, score_mod=usermods.smod, score_mod_args=(tab,),
                             mask_mod=usermods.mmod, causal=True)
    t2 = time.perf_counter()
    ref = reference.attention(q, k, v, score_mod=usermods.smod, score_mod_args=(tab,),
                              mask_mod=usermods.mmod, causal=True)
    (fps, var), = fk.flash_forward_mods.variants()
    st = var.stats
    print(json.dumps(dict(err=float(np.max(np.abs(o - ref))), first_call=t2 - t1,
                          hits=sum(st.cache_hits.values()),
                          misses=sum(st.cache_misses.values()),
                          how=fk.flash_forward_mods.last[0])))
""")

MODS = textwrap.dedent("""
    import numba

    @numba.njit
    def helper(score, j):
        return score * SCALE + 0.25 * (j % 3)

    SCALE = {scale}

    def smod(score, b, h, i, j, tab):
        return helper(score, j) + tab[(i - j) % 64]

    def mmod(b, h, i, j):
        return (i + j) % 5 != 1
""")


def child(tmp_path, **fmt):
    (tmp_path / "usermods.py").write_text(MODS.format(**fmt))
    env = dict(os.environ, NUMBA_ATTN_CACHE_DIR=str(tmp_path / "mods"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_second_process_loads_the_mod_kernel_and_an_edit_recompiles(tmp_path):
    first = child(tmp_path, scale="1.0")
    assert first["err"] < 2e-5 and first["misses"] == 1 and first["hits"] == 0, first
    assert first["how"] == "disk"
    second = child(tmp_path, scale="1.0")
    assert second["err"] < 2e-5 and second["hits"] == 1 and second["misses"] == 0, second
    # an edit of a constant the mod's helper reads: a new variant, never the stale one
    edited = child(tmp_path, scale="0.5")
    assert edited["err"] < 2e-5 and edited["misses"] == 1 and edited["hits"] == 0, edited
    assert len([n for n in os.listdir(tmp_path / "mods") if n.endswith(".py")]) == 2
    print(f"first modded call: compile {first['first_call']:.2f} s, "
          f"second process {second['first_call']:.2f} s")


# ---------------------------------------------------------------------------------------
# fingerprints (no compiling)
# ---------------------------------------------------------------------------------------
def _fn(src, name, **glb):
    g = dict(glb)
    exec(textwrap.dedent(src), g)
    return g[name]


def test_fingerprint_sees_code_constants_globals_closures_and_helpers():
    base = "def f(s, b, h, i, j):\n    return s * 2.0 + C\n"
    a = _fn(base, "f", C=1.0)
    assert mc.fingerprint(a) == mc.fingerprint(_fn(base, "f", C=1.0))  # same code, same key
    assert mc.fingerprint(a) != mc.fingerprint(_fn(base, "f", C=2.0))  # a global's value
    assert mc.fingerprint(a) != mc.fingerprint(_fn(base.replace("2.0", "3.0"), "f", C=1.0))
    assert mc.fingerprint(a) != mc.fingerprint(_fn(base.replace("*", "+"), "f", C=1.0))

    def make(c):
        return lambda s, b, h, i, j: s + c

    assert mc.fingerprint(make(1)) == mc.fingerprint(make(1))
    assert mc.fingerprint(make(1)) != mc.fingerprint(make(2))  # a closure cell's value
    # a helper's code, two levels down, and an njit helper's options
    h1 = numba.njit(_fn("def g(x):\n    return x + 1\n", "g"))
    h2 = numba.njit(_fn("def g(x):\n    return x + 2\n", "g"))
    top = "def f(s, b, h, i, j):\n    return g(s)\n"
    assert mc.fingerprint(_fn(top, "f", g=h1)) != mc.fingerprint(_fn(top, "f", g=h2))
    assert mc.fingerprint(_fn(top, "f", g=h1)) != mc.fingerprint(
        _fn(top, "f", g=numba.njit(fastmath=True)(h1.py_func)))
    # an array global's contents (Numba freezes global arrays into the code)
    arr = "def f(s, b, h, i, j):\n    return s + T[j]\n"
    assert mc.fingerprint(_fn(arr, "f", T=np.arange(3.0))) != mc.fingerprint(
        _fn(arr, "f", T=np.arange(3.0) * 2))
    # module attributes read through a user's module
    import types

    m1, m2 = types.ModuleType("usermod_x"), types.ModuleType("usermod_x")
    m1.K, m2.K = 1.0, 2.0
    viamod = "def f(s, b, h, i, j):\n    return s + um.K\n"
    assert mc.fingerprint(_fn(viamod, "f", um=m1)) != mc.fingerprint(_fn(viamod, "f", um=m2))
    # stable modules and builtins are named, not walked
    assert mc.fingerprint(_fn("def f(s, b, h, i, j):\n    return math.tanh(abs(s))\n", "f",
                              math=math))


def test_a_global_it_cannot_vouch_for_makes_the_mod_uncacheable():
    f = _fn("def f(s, b, h, i, j):\n    return s + O.x\n", "f", O=object())
    with pytest.raises(mc.Uncacheable, match="O"):
        mc.fingerprint(f)


def test_variant_key_depends_on_the_kernel_and_each_mod():
    from numba_attn.cpu import forward as fk

    k1 = mc.variant_key(fk.flash_forward, ("a", None))
    assert k1 == mc.variant_key(fk.flash_forward, ("a", None))
    assert k1 != mc.variant_key(fk.flash_forward, (None, "a"))
    assert k1 != mc.variant_key(fk.merge_splits, ("a", None))


def test_closures_over_different_constants_give_different_answers(tmp_path, monkeypatch):
    """Through create_block_mask (a small kernel on the same ModKernel machinery): the
    flags against numpy's evaluation of the same window."""
    import numba_attn

    monkeypatch.setenv("NUMBA_ATTN_CACHE_DIR", str(tmp_path))

    def make(w):
        def window(b, h, i, j):
            return abs(i - j) <= w
        return window

    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    for w in (1, 20):
        bm = numba_attn.create_block_mask(make(w), 1, 1, 64, 64, block_size=8)
        keep = (np.abs(i - j) <= w).reshape(8, 8, 8, 8).transpose(0, 2, 1, 3)
        want = np.where(keep.all(axis=(2, 3)), 2, np.where(keep.any(axis=(2, 3)), 1, 0))
        np.testing.assert_array_equal(bm.flags[0, 0], want)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".py")]) == 2


SAME_CODE_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import numba_attn
    from numba_attn import reference
    sys.path.insert(0, sys.argv[1])
    mods = __import__(sys.argv[2])
    doc = np.repeat(np.arange(3), 11)[None]
    q, k, v = (np.random.default_rng(5).standard_normal((1, 33, 2, 16), dtype=np.float32)
               for _ in range(3))
    bm = numba_attn.create_block_mask(mods.same_doc, 1, 1, 33, 33, mask_mod_args=(doc,),
                                      block_size=8)
    o = numba_attn.attention(q, k, v, mask_mod=mods.same_doc, mask_mod_args=(doc,),
                             block_mask=bm)
    ref = reference.attention(q, k, v, mask_mod=mods.same_doc, mask_mod_args=(doc,))
    print(json.dumps(dict(err=float(np.max(np.abs(o - ref))))))
""")


def test_equal_mods_of_two_modules_do_not_share_an_entry(tmp_path):
    """The same mod code in module a (importable only in the first process) and module b
    (the second): the second must not load the first's entry, whose pickled environment
    names module a (it raised ModuleNotFoundError from create_block_mask and attention)."""
    src = "def same_doc(b, h, i, j, doc):\n    return doc[b, i] == doc[b, j] and j <= i\n"
    env = dict(os.environ, NUMBA_ATTN_CACHE_DIR=str(tmp_path / "mods"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    for name in ("user_mods_a", "user_mods_b"):
        d = tmp_path / name
        d.mkdir()
        (d / f"{name}.py").write_text(src)
        r = subprocess.run([sys.executable, "-c", SAME_CODE_CHILD, str(d), name],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["err"] < 1e-5


def test_fingerprint_includes_the_module():
    ns_a, ns_b = {"__name__": "mods_a"}, {"__name__": "mods_b"}
    src = "def f(b, h, i, j):\n    return j <= i\n"
    exec(src, ns_a)
    exec(src, ns_b)
    ns_c = {"__name__": "mods_a"}
    exec(src, ns_c)
    assert mc.fingerprint(ns_a["f"]) != mc.fingerprint(ns_b["f"])
    assert mc.fingerprint(ns_a["f"]) == mc.fingerprint(ns_c["f"])
