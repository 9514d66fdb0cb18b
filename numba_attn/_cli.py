"""``python -m numba_attn info`` and ``selftest``: what this machine has, and whether every
available backend agrees with the numpy oracle (numba_attn.reference)."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["info", "selftest", "selftest_cases", "TOLERANCES"]

# max |got - expected| / max(1, max |expected|) per dtype (DESIGN.md, "Testing")
TOLERANCES = {"float64": 1e-9, "float32": 2e-5, "float16": 4e-3}


# ---------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------
def _version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def cuda_install_hint():
    """How to install the cuda backend's dependency: the package's own extras."""
    from .cuda import INSTALL_HINT

    return INSTALL_HINT


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_FIRST_CALL = []


def first_call_seconds():
    """Time a tiny :func:`numba_attn.attention` call (compile or on-disk cache load + run);
    it also starts Numba's threading layer so that ``numba.threading_layer()`` answers.
    Measured once per process (``info`` then ``selftest`` report the same first call)."""
    import numba_attn

    if not _FIRST_CALL:
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 24, 4, 16), dtype=np.float32)
        kv = rng.standard_normal((1, 24, 2, 16), dtype=np.float32)
        t0 = time.perf_counter()
        numba_attn.attention(q, kv, kv, causal=True)
        _FIRST_CALL.append(time.perf_counter() - t0)
    return _FIRST_CALL[0]


_STARTUP = """\
import sys, time
t0 = time.perf_counter()
import numpy as np, numba_attn
t1 = time.perf_counter()
q = np.ones((1, 8, 4, 16), np.float32)
numba_attn.attention(q, q, q, causal=True)
t2 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from startup_mod import shift
numba_attn.attention(q, q, q, score_mod=shift, score_mod_args=(0.5,))
t3 = time.perf_counter()
out, vjp = numba_attn.attention_vjp(q, q, q, causal=True)
vjp(out)
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""

_STARTUP_MOD = """\
def shift(score, b, h, q_idx, kv_idx, c):
    return score + c * (kv_idx % 2)
"""


def startup_times():
    """Fresh-process seconds of import, the first float32 call, the first call with a
    score_mod (a mod file in the temporary directory) and the first backward, with an
    empty on-disk cache (cold compile), then again with that cache warm. Uses a temporary
    NUMBA_CACHE_DIR (and so a temporary mod cache): {label: {import, first, mod,
    backward, wall}}."""
    import subprocess
    import tempfile

    res = {}
    with tempfile.TemporaryDirectory(prefix="numba_attn_cache_") as tmp:
        with open(os.path.join(tmp, "startup_mod.py"), "w") as f:
            f.write(_STARTUP_MOD)
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp)
        env.pop("NUMBA_ATTN_CACHE_DIR", None)
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _STARTUP, tmp], env=env,
                                  capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
            vals = [float(x) for x in proc.stdout.split()[-4:]]
            res[label] = dict(zip(("import", "first", "mod", "backward"), vals), wall=wall)
    return res


def info(out=None, startup=False):
    """Print versions, CPU, threads, BLAS and every backend with the reason it cannot serve.

    With ``startup``, also time import + first call in fresh processes, cold (empty
    on-disk cache: JIT compile) and warm (cache load).
    """
    import llvmlite.binding as llb
    import numba

    import numba_attn

    w = (out or sys.stdout).write
    w("numba_attn info\n")
    w(f"  numba_attn   {numba_attn.__version__}  ({os.path.dirname(numba_attn.__file__)})\n")
    w(f"  python       {platform.python_version()} ({sys.executable})\n")
    w(f"  platform     {platform.platform()}\n")
    for dist in ("numpy", "numba", "llvmlite", "numba-cuda",
                 "ml_dtypes", "torch"):
        note = "  (optional peer, never imported by numba_attn)" if dist == "torch" else ""
        if dist == "numba-cuda" and _version(dist) == "not installed":
            note = f"  (for the cuda backend: {cuda_install_hint()})"
        w(f"  {dist:<13} {_version(dist)}{note}\n")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    w(f"  cpu          {_cpu_model()}; {os.cpu_count()} logical cores, {affinity} usable; "
      f"llvm target {llb.get_host_cpu_name()}\n")
    first = first_call_seconds()
    try:
        layer = numba.threading_layer()
    except ValueError as e:  # no parallel region ran
        layer = f"unknown ({e})"
    w(f"  numba        {numba.get_num_threads()} threads (NUMBA_NUM_THREADS="
      f"{numba.config.NUMBA_NUM_THREADS}); threading layer {layer} "
      f"(requested {numba.config.THREADING_LAYER!r})\n")
    w(f"  numba cache  {numba.config.CACHE_DIR or '__pycache__ beside the sources'}\n")
    w(f"  first call   {first:.2f}s (tiny float32 attention: JIT compile or cache load)\n")
    w("  simd         " + _simd_line() + "\n")
    from . import _modcache, _warmup

    status = _warmup.cached_status()
    ncached = sum(v == "cached" for v in status.values())
    w(f"  variants     {ncached}/{len(status)} in the disk cache for this CPU target"
      + ("" if ncached == len(status) else " (python -m numba_attn warmup compiles them)")
      + "\n")
    for dts in _warmup.DTYPES:
        row = ", ".join(f"{p} {status[dts + ' ' + p]}" for p in _warmup.PATHS)
        w(f"               {dts:<9} {row}\n")
    nmods = len(_modcache.cached_variants())
    w(f"  mod cache    {_modcache.cache_dir()} ({nmods} score_mod / mask_mod kernels)\n")
    if startup:
        for label, row in startup_times().items():
            w(f"  start-up     {label} cache: import {row['import']:.2f}s + first call "
              f"{row['first']:.2f}s; first score_mod call {row['mod']:.2f}s; first "
              f"backward {row['backward']:.2f}s (process wall {row['wall']:.2f}s)\n")
    w("backends\n")
    for name, why in numba_attn.available_backends().items():
        w(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}\n")


def _simd_line():
    from .cpu import simd

    return (f"{simd.ISA} ({simd.VECTOR_BYTES * 8}-bit vectors: {simd.LANES32} float32 / "
            f"{simd.LANES64} float64 lanes; NUMBA_CPU_NAME / NUMBA_CPU_FEATURES choose "
            "another target); no BLAS inside the kernels")


# ---------------------------------------------------------------------------------------
# selftest
# ---------------------------------------------------------------------------------------
@dataclass
class Case:
    """One selftest row: ``kind`` is "attention", "varlen", "kvcache" or "merge"."""

    name: str
    kind: str = "attention"
    b: int = 2
    sq: int = 37
    sk: int = 53
    h: int = 4
    hkv: int = 4
    d: int = 32
    dtype: str = "float32"
    opts: dict = field(default_factory=dict)
    quick: bool = False


def selftest_cases():
    """The selftest grid; rows with ``quick=True`` form ``selftest --quick``."""
    c = Case
    return [
        c("mha", quick=True),
        c("gqa", hkv=2, quick=True),
        c("mqa", hkv=1),
        c("gqa causal sq<sk", hkv=2, opts=dict(causal=True), quick=True),
        c("causal sq>sk (empty rows)", sq=53, sk=37, opts=dict(causal=True)),
        c("causal top_left", opts=dict(causal="top_left")),
        c("window (8, 4)", opts=dict(window=(8, 4)), quick=True),
        c("window left only, causal", opts=dict(window=(16, -1), causal=True)),
        c("softcap 5", opts=dict(softcap=5.0)),
        c("alibi per head", opts=dict(alibi_slopes="h")),
        c("alibi per batch, causal", opts=dict(alibi_slopes="bh", causal=True)),
        c("bias (1, H, Sq, Sk)", opts=dict(bias="1hqk"), quick=True),
        c("mask (B, 1, Sq, Sk)", opts=dict(mask="b1qk")),
        c("kv_lens with 0", opts=dict(kv_lens=True), quick=True),
        c("sinks, causal", opts=dict(sinks=True, causal=True)),
        c("everything, gqa", hkv=2, opts=dict(causal=True, window=(20, -1), softcap=8.0,
                                              alibi_slopes="h", bias="1hqk", mask="b1qk",
                                              kv_lens=True, sinks=True)),
        c("decode sq=1 sk=700 (split keys)", b=1, sq=1, sk=700, h=8, hkv=2, d=64,
          quick=True),
        c("kvcache decode, append 1, ragged", kind="kvcache", sq=1, sk=300, h=8, hkv=2,
          quick=True),
        c("kvcache decode, causal softcap sinks", kind="kvcache", sq=1, sk=90, h=4, hkv=1,
          opts=dict(causal=True, softcap=5.0, sinks=True)),
        c("head_dim 128 gqa causal", sq=70, sk=70, h=8, hkv=2, d=128, opts=dict(causal=True)),
        c("varlen with empty segment", kind="varlen", opts=dict(causal=True), quick=True),
        c("merge_states (one part empty)", kind="merge", quick=True),
        c("mha", dtype="float64"),
        c("gqa causal softcap", dtype="float64", hkv=2, opts=dict(causal=True, softcap=5.0)),
        c("varlen with empty segment", kind="varlen", dtype="float64"),
        c("merge_states (one part empty)", kind="merge", dtype="float64"),
        c("gqa causal", dtype="float16", hkv=2, opts=dict(causal=True)),
        c("bias + kv_lens", dtype="float16", opts=dict(bias="1hqk", kv_lens=True)),
    ]


def _make(case, rng):
    """Inputs (in the case dtype) and the matching keyword options."""
    dt = np.dtype(case.dtype)

    def randn(*shape):
        return rng.standard_normal(shape).astype(dt)

    kw = dict(case.opts)
    b, sq, sk, h = case.b, case.sq, case.sk, case.h
    if kw.get("alibi_slopes") == "h":
        kw["alibi_slopes"] = rng.uniform(0.01, 0.3, h)
    elif kw.get("alibi_slopes") == "bh":
        kw["alibi_slopes"] = rng.uniform(0.01, 0.3, (b, h))
    if kw.get("bias") == "1hqk":
        kw["bias"] = randn(1, h, sq, sk)
    if kw.get("mask") == "b1qk":
        kw["mask"] = rng.random((b, 1, sq, sk)) < 0.8
    if kw.get("kv_lens"):
        kw["kv_lens"] = np.array([0] + [sk - 5] * (b - 1), np.int32)
    if kw.get("sinks"):
        kw["sinks"] = rng.uniform(-1.0, 2.0, h)
    q = randn(b, sq, h, case.d)
    k = randn(b, sk, case.hkv, case.d)
    v = randn(b, sk, case.hkv, case.d)
    return q, k, v, kw


def _to_device(x, backend):
    if backend != "cuda" or not isinstance(x, np.ndarray):
        return x
    from numba import cuda

    return cuda.to_device(x)


def _to_host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


def _err(got, expected):
    """max |got - expected| relative to max(1, max |expected|); -inf must match -inf."""
    got = _to_host(got).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    fin = np.isfinite(expected)
    if not np.array_equal(fin, np.isfinite(got)) or np.isnan(got).any():
        return np.inf
    if not fin.any():
        return 0.0
    diff = np.abs(got[fin] - expected[fin]).max()
    return float(diff / max(1.0, np.abs(expected[fin]).max()))


def _kvcache_case(case, backend, rng, q, kw):
    """One decode step: append one token per row to a KVCache, attend, vs the reference
    over each row's concatenated keys (rows of different lengths)."""
    import numba_attn
    from numba_attn import reference as ref

    dt, b, hkv, d, n = q.dtype, case.b, case.hkv, case.d, case.sk
    device = "cuda" if backend == "cuda" else "cpu"
    cache = numba_attn.KVCache(b, n + 4, hkv, d, dtype=dt, device=device)
    kp, vp, kn, vn = (rng.standard_normal((b, m, hkv, d)).astype(dt)
                      for m in (n, n, 1, 1))
    cache.append(_to_device(kp, backend), _to_device(vp, backend))
    lens = np.array([n - 7 * i for i in range(b)], np.int32)
    cache.seqlens = lens
    got = numba_attn.attention_with_kvcache(
        _to_device(q, backend), cache, _to_device(kn, backend), _to_device(vn, backend),
        return_lse=True, backend=backend, **kw)
    outs, lses = [], []
    for r in range(b):
        kr = np.concatenate([kp[r, :lens[r]], kn[r]])[None]
        vr = np.concatenate([vp[r, :lens[r]], vn[r]])[None]
        o, lse = ref.attention(q[r:r + 1], kr, vr, return_lse=True, **kw)
        outs.append(o)
        lses.append(lse)
    return got, (np.concatenate(outs), np.concatenate(lses))


def run_case(case, backend, rng):
    """(max error, tolerance) of one case on one backend."""
    import numba_attn
    from numba_attn import reference as ref

    q, k, v, kw = _make(case, rng)
    dev = kw  # options (bias, mask, kv_lens, cu_seqlens, ...) stay host arrays
    if case.kind == "attention":
        got = numba_attn.attention(_to_device(q, backend), _to_device(k, backend),
                                   _to_device(v, backend), return_lse=True, backend=backend,
                                   **dev)
        expected = ref.attention(q, k, v, return_lse=True, **kw)
    elif case.kind == "varlen":
        lq, lk = np.array([5, 0, 17, 9]), np.array([9, 3, 20, 0])
        cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        dt, d = q.dtype, case.d
        q = rng.standard_normal((cq[-1], case.h, d)).astype(dt)
        k, v = (rng.standard_normal((ck[-1], case.hkv, d)).astype(dt) for _ in range(2))
        args = (q, k, v, cq, ck)
        got = numba_attn.attention_varlen(*(_to_device(x, backend) for x in args[:3]),
                                          cq, ck, return_lse=True, backend=backend, **dev)
        expected = ref.attention_varlen(*args, return_lse=True, **kw)
    elif case.kind == "kvcache":
        got, expected = _kvcache_case(case, backend, rng, q, kw)
    elif case.kind == "merge":
        n = case.sk // 2
        parts = []
        for lo, hi, lens in ((0, n, None), (n, case.sk, np.array([0, 7], np.int32))):
            o, lse = numba_attn.attention(q, k[:, lo:hi], v[:, lo:hi], kv_lens=lens,
                                          return_lse=True, backend="reference")
            parts += [o, lse]
        got = numba_attn.merge_states(*(_to_device(x, backend) for x in parts))
        expected = ref.merge_states(*parts)
    else:
        raise ValueError(f"unknown case kind {case.kind!r}")
    err = max(_err(got[0], expected[0]), _err(got[1], expected[1]))
    return err, TOLERANCES[case.dtype]


def _cudasim():
    import numba

    return bool(getattr(numba.config, "ENABLE_CUDASIM", False))


def selftest(quick=False, backends=None, out=None, seed=0):
    """Run every available backend against the reference; print a table; return 0 or 1."""
    import numba_attn

    w = (out or sys.stdout).write
    avail = numba_attn.available_backends()
    names = [n for n, why in avail.items() if why is None and (not backends or n in backends)]
    for n, why in avail.items():
        if why is not None:
            w(f"selftest: backend {n} skipped: {why}\n")
    if "cuda" in names and not backends and _cudasim():
        names.remove("cuda")
        w("selftest: backend cuda skipped: NUMBA_ENABLE_CUDASIM=1 (the simulator lacks warp "
          "shuffles; tests/cuda_sim adds them; `selftest --backend cuda` forces it)\n")
    cases = [c for c in selftest_cases() if (c.quick or not quick) and
             (c.kind != "kvcache" or hasattr(numba_attn, "attention_with_kvcache"))]
    t0 = time.perf_counter()
    first = first_call_seconds()
    w(f"selftest: first call {first:.2f}s (JIT compile or cache load)\n")
    rows = []
    for be in names:
        for case in cases:
            if case.kind == "merge" and be == "reference":
                continue  # merge_states has no backend argument; it runs where data lives
            rng = np.random.default_rng([seed, len(rows)])
            try:
                err, tol = run_case(case, be, rng)
                status = "pass" if err <= tol else "FAIL"
                detail = ""
            except Exception as e:  # a crash is a failed row, reported with its message
                err, tol, status = float("nan"), TOLERANCES[case.dtype], "FAIL"
                detail = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
            rows.append((be, case.dtype, case.name, err, tol, status, detail))
    head = ("backend", "dtype", "case", "max err", "tol", "result")
    wid = [max(len(head[i]), *(len(str(r[i])) for r in rows)) if rows else len(head[i])
           for i in range(3)]
    fmt = f"{{:<{wid[0]}}}  {{:<{wid[1]}}}  {{:<{wid[2]}}}  {{:>9}}  {{:>7}}  {{}}\n"
    w(fmt.format(*head))
    w(fmt.format(*("-" * wd for wd in wid + [9, 7, 6])))
    for be, dt, name, err, tol, status, detail in rows:
        w(fmt.format(be, dt, name, f"{err:.1e}", f"{tol:.0e}",
                     status + (f"  {detail}" if detail else "")))
    nfail = sum(r[5] != "pass" for r in rows)
    w(f"selftest: {len(rows) - nfail}/{len(rows)} passed on {', '.join(names)} in "
      f"{time.perf_counter() - t0:.1f}s" + (f"; {nfail} FAILED\n" if nfail else "\n"))
    return 1 if nfail or not rows else 0
