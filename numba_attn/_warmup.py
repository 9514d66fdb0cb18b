"""``python -m numba_attn warmup``: compile the common kernel variants into the disk cache.

Each variant (a dtype x forward / varlen / decode / backward) runs a tiny call in its own
child process, several at once (compiling is single-threaded), so a user or a Docker
build pays the JIT once for this machine's SIMD target. A child records which Numba
dispatchers and signatures its call used in ``warmup.json`` in numba_attn's cache
directory; ``python -m numba_attn info`` checks those against Numba's on-disk indexes to
say which variants are cached now (a source edit, a Numba upgrade or another CPU target
makes an entry stale, and it says so).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

__all__ = ["variants", "warmup", "cached_status"]

DTYPES = ("float32", "float16", "bfloat16", "float64")
PATHS = ("forward", "varlen", "decode", "backward")


def variants():
    """Names of the warm-up variants: ``"<dtype> <path>"``."""
    return [f"{dt} {p}" for dt in DTYPES for p in PATHS]


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _run(name):
    """The calls of one variant (in the current process)."""
    import numba_attn

    dts, path = name.split()
    dt = _dtype(dts)
    rng = np.random.default_rng(0)

    def randn(*shape):
        return rng.standard_normal(shape).astype(dt)

    if path == "forward":
        for sq in (64, 1):  # the fused forward and the decode-sized path
            q, k = randn(1, sq, 4, 64), randn(1, 80, 2, 64)
            numba_attn.attention(q, k, k, causal=True)
        q = randn(1, 24, 4, 16)  # the `first call` probe of info / selftest
        numba_attn.attention(q, randn(1, 24, 2, 16), randn(1, 24, 2, 16), causal=True)
    elif path == "varlen":
        cu = np.array([0, 5, 37], np.int32)
        q, k = randn(37, 4, 64), randn(37, 2, 64)
        numba_attn.attention_varlen(q, k, k, cu, cu, causal=True)
    elif path == "decode":
        cache = numba_attn.KVCache(2, 96, 2, 64, dtype=dt)
        cache.append(randn(2, 40, 2, 64), randn(2, 40, 2, 64))
        numba_attn.attention_with_kvcache(randn(2, 1, 4, 64), cache, randn(2, 1, 2, 64),
                                          randn(2, 1, 2, 64), causal=True)
    elif path == "backward":
        q, k = randn(1, 48, 4, 64), randn(1, 48, 2, 64)
        out, vjp = numba_attn.attention_vjp(q, k, k, causal=True)
        vjp(np.ones_like(out))
    else:
        raise ValueError(f"unknown warm-up path {path!r}")


def _dispatchers():
    """Every cached (on-disk) Numba dispatcher of numba_attn's CPU modules."""
    import numba

    import numba_attn  # noqa: F401  (imports the kernels)

    out = {}
    for modname, mod in list(sys.modules.items()):
        if not (modname == "numba_attn" or modname.startswith("numba_attn.")):
            continue
        if modname.startswith("numba_attn.cuda"):
            continue
        for attr, d in list(vars(mod).items()):
            if (isinstance(d, numba.core.registry.CPUDispatcher)
                    and getattr(d, "_cache", None) is not None
                    and type(d._cache).__name__ != "NullCache"
                    and d.py_func.__module__ == modname):
                out[(modname, d.py_func.__qualname__)] = d
    return out


def _child(name):
    """Run one variant, print a JSON line: seconds and the (dispatcher, signature) used."""
    t0 = time.perf_counter()
    _run(name)
    used = sorted((m, q, str(sig)) for (m, q), d in _dispatchers().items()
                  for sig in d.signatures)
    print(json.dumps({"variant": name, "seconds": time.perf_counter() - t0, "used": used}))


def _manifest_path():
    from ._modcache import cache_dir

    return os.path.join(cache_dir(), "warmup.json")


def _target_key():
    """Numba's CPU target (triple, CPU name, a hash of the features)."""
    import hashlib

    from ._modcache import _target

    t = _target()
    return f"{t[0]} {t[1]} {hashlib.sha256(' '.join(t).encode()).hexdigest()[:12]}"


def _bar(done, total, width=24):
    n = int(width * done / max(total, 1))
    return "[" + "#" * n + "." * (width - n) + f"] {done}/{total}"


def warmup(jobs=None, only=None, out=None):
    """Compile the variants (names containing ``only``) in ``jobs`` parallel processes;
    print a progress bar and a summary; return 0, or 1 when a variant failed."""
    w = (out or sys.stdout).write
    tty = hasattr(out or sys.stdout, "isatty") and (out or sys.stdout).isatty()
    names = [n for n in variants() if not only or only in n]
    skipped = []
    if any(n.startswith("bfloat16") for n in names):
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            skipped = [n for n in names if n.startswith("bfloat16")]
            names = [n for n in names if n not in skipped]
    jobs = max(1, int(jobs or min(len(names) or 1, os.cpu_count() or 1)))
    from .cpu import simd

    w(f"warmup: {len(names)} variants for {simd.ISA} in {jobs} processes "
      f"(Numba cache: {os.environ.get('NUMBA_CACHE_DIR') or '__pycache__ beside the sources'})"
      "\n")
    for n in skipped:
        w(f"warmup: {n} skipped: ml_dtypes is not installed\n")
    code = "import sys; from numba_attn import _warmup; _warmup._child(sys.argv[1])"
    pending, running, results, failed = list(names), {}, [], []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            n = pending.pop(0)
            running[n] = subprocess.Popen([sys.executable, "-c", code, n],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
        time.sleep(0.1)
        for n, p in list(running.items()):
            if p.poll() is None:
                continue
            so, se = p.communicate()
            del running[n]
            if p.returncode == 0:
                results.append(json.loads(so.strip().splitlines()[-1]))
                status = f"{results[-1]['seconds']:.1f}s"
            else:
                failed.append((n, se.strip().splitlines()[-1] if se.strip() else
                               f"exit {p.returncode}"))
                status = "FAILED"
            line = (f"{_bar(len(results) + len(failed), len(names))}  {n}: {status}  "
                    f"({time.perf_counter() - t0:.0f}s)")
            w(("\r" + line.ljust(78)) if tty else line + "\n")
    if tty:
        w("\n")
    manifest = {}
    try:
        with open(_manifest_path()) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        pass
    entry = manifest.setdefault(_target_key(), {})
    for r in results:
        entry[r["variant"]] = r["used"]
    try:
        os.makedirs(os.path.dirname(_manifest_path()), exist_ok=True)
        with open(_manifest_path(), "w") as f:
            json.dump(manifest, f, indent=1)
    except OSError as e:
        w(f"warmup: could not write {_manifest_path()}: {e}\n")
    for n, why in failed:
        w(f"warmup: {n} FAILED: {why}\n")
    w(f"warmup: {len(results)}/{len(names)} variants compiled or already cached in "
      f"{time.perf_counter() - t0:.1f}s\n")
    return 1 if failed else 0


def _index_sigs(d):
    """repr of the signatures in dispatcher ``d``'s fresh on-disk index for this target."""
    from numba.core.registry import cpu_target

    cache = d._cache
    try:
        overloads = cache._cache_file._load_index()
    except Exception:  # an unreadable index is a stale one
        return set()
    magic = cpu_target.target_context.codegen().magic_tuple()
    key = cache._index_key  # (sig, magic, hashes) of a current entry
    sigs = set()
    for k in overloads:
        try:
            if k[1] == magic and k == key(k[0], cpu_target.target_context.codegen()):
                sigs.add(str(k[0]))
        except Exception:
            pass
    return sigs


def _has_ml_dtypes():
    import importlib.util

    return importlib.util.find_spec("ml_dtypes") is not None


def cached_status():
    """{variant: "cached" | "stale" | "not warmed" | "needs ml_dtypes"} for this CPU
    target (bfloat16 variants need ml_dtypes, which warmup skips without it)."""
    try:
        with open(_manifest_path()) as f:
            entry = json.load(f).get(_target_key(), {})
    except (OSError, ValueError):
        entry = {}
    import importlib

    memo = {}
    res = {}
    for n in variants():
        used = entry.get(n)
        if used is None:
            res[n] = "needs ml_dtypes" if n.startswith("bfloat16") and not _has_ml_dtypes() \
                else "not warmed"
            continue
        ok = True
        for m, q, sig in used:
            if (m, q) not in memo:
                try:
                    d = getattr(importlib.import_module(m), q.split(".")[-1])
                    memo[m, q] = _index_sigs(d)
                except Exception:  # a kernel renamed or gone: stale
                    memo[m, q] = set()
            if sig not in memo[m, q]:
                ok = False
                break
        res[n] = "cached" if ok else "stale (run warmup again)"
    return res
