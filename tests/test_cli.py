"""``python -m numba_attn``: info, selftest and bench run and say what they should; the
bench peers compute attention (checked against the reference)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numba_attn
from numba_attn import _cli, bench, dispatch
from numba_attn import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "numba_attn", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.timeout(300)
def test_info_lists_versions_threads_and_every_backend():
    rc, out, err = run_cli("info")
    assert rc == 0, err
    from numba_attn.cpu import simd

    for word in ("numba_attn", "numpy", "numba", "llvmlite", "threading layer",
                 f"simd         {simd.ISA}", "first call"):
        assert word in out, f"{word!r} missing from info:\n{out}"
    backends = out.split("\nbackends\n", 1)[1].splitlines()
    for name, why in numba_attn.available_backends().items():
        line = next((ln for ln in backends if ln.split()[0] == name), None)
        assert line is not None, f"backend {name} missing from info:\n{out}"
        assert ("unavailable: " + why if why else "available") in line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_selftest_quick_passes_on_every_available_backend():
    rc, out, err = run_cli("selftest", "--quick")
    assert rc == 0, out + err
    rows = [ln.split()[0] for ln in out.splitlines() if " pass" in ln or "FAIL" in ln]
    assert "FAIL" not in out
    for name, why in numba_attn.available_backends().items():
        if why is None:
            assert name in rows, f"no selftest row for backend {name}:\n{out}"
        else:
            assert f"backend {name} skipped" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_quick_filter_prints_a_table():
    rc, out, err = run_cli("bench", "--quick", "--filter", "gpt2_prefill_512_causal")
    assert rc == 0, err
    assert "vector FMA peak" in out and "numpy sgemm" in out and "stream-read" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("shape"))
    assert "ms" in header and "GFLOP/s" in header and "vs numpy" in header
    rows = [ln for ln in out.splitlines() if ln.startswith("gpt2_prefill_512_causal")]
    assert len(rows) == 1
    assert "gpt2_prefill_512 " not in out  # the filter kept one shape
    assert "% fma" in rows[0]  # prefill rows report their share of the same-run FMA peak
    assert "numba_attn" in err and "bench: done" in err  # progress on stderr


def test_bench_filter_without_match_exits_with_the_shape_names():
    with pytest.raises(SystemExit, match="gpt2_prefill_512"):
        bench.run_bench(quick=True, name_filter="no_such_shape", out=io.StringIO(),
                        err=io.StringIO())


class _OffByOne(dispatch.ReferenceBackend):
    """A wrong backend: the reference answer plus 1e-3."""

    name = "off_by_one"

    def run(self, problem):
        out, lse = super().run(problem)
        return out + 1e-3, lse


def test_selftest_reports_a_wrong_backend_and_returns_1(monkeypatch):
    monkeypatch.setitem(dispatch.BACKENDS, "off_by_one", _OffByOne())
    buf = io.StringIO()
    rc = _cli.selftest(quick=True, backends=["off_by_one"], out=buf)
    assert rc == 1
    rows = [ln for ln in buf.getvalue().splitlines() if ln.startswith("off_by_one")]
    assert rows and all("FAIL" in ln for ln in rows if "merge" not in ln)


def test_selftest_row_errors_are_failures(monkeypatch):
    class Crashing(dispatch.ReferenceBackend):
        name = "crashing"

        def run(self, problem):
            raise RuntimeError("boom")

    monkeypatch.setitem(dispatch.BACKENDS, "crashing", Crashing())
    buf = io.StringIO()
    assert _cli.selftest(quick=True, backends=["crashing"], out=buf) == 1
    assert "RuntimeError: boom" in buf.getvalue()


@pytest.mark.parametrize("sq, sk, causal", [(4, 4, False), (4, 4, True), (2, 5, True),
                                            (5, 2, True), (7, 30, True)],
                         ids=lambda x: str(x))
def test_visible_pairs_counts_the_bottom_right_causal_mask(sq, sk, causal):
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    expected = int(((j <= i + sk - sq) | (not causal)).sum())
    assert bench.visible_pairs(sq, sk, causal) == expected


def _small(name, sq, sk, h, hkv, causal):
    return bench.Shape(name, 2, sq, sk, h, hkv, 16, causal)


PEER_SHAPES = [_small("mha", 9, 9, 4, 4, False), _small("mha-causal", 9, 9, 4, 4, True),
               _small("gqa-causal", 12, 12, 4, 2, True), _small("decode", 1, 20, 4, 1, False)]


@pytest.mark.parametrize("shape", PEER_SHAPES, ids=lambda s: s.name)
def test_numpy_peer_is_attention(shape):
    q, k, v = bench.make_inputs(shape, seed=1)
    got = bench.numpy_peer(shape, q, k, v)()
    expected = ref.attention(q, k, v, causal=shape.causal)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", PEER_SHAPES, ids=lambda s: s.name)
def test_torch_peer_is_attention(shape):
    pytest.importorskip("torch")
    q, k, v = bench.make_inputs(shape, seed=2)
    got = bench.torch_peer(shape, q, k, v, threads=1)().numpy().transpose(0, 2, 1, 3)
    expected = ref.attention(q, k, v, causal=shape.causal)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_numpy_peer_skips_score_matrices_that_do_not_fit():
    long = next(s for s in bench.SHAPES if s.name == "long_16k")
    assert "GiB" in bench.numpy_peer_reason(long)
    assert bench.numpy_peer_reason(PEER_SHAPES[0]) is None


def test_time_call_warms_up_then_takes_the_median():
    calls = []
    med, warm, n = bench.time_call(lambda: calls.append(1), min_repeats=3, max_repeats=5,
                                   target_s=0.0)
    assert n == 3 and len(calls) == 4 and med >= 0.0 and warm >= 0.0


def test_info_names_the_cuda_extras_when_numba_cuda_is_missing(monkeypatch):
    import io

    from numba_attn import _cli

    real = _cli._version
    monkeypatch.setattr(_cli, "_version",
                        lambda dist: "not installed" if dist == "numba-cuda" else real(dist))
    buf = io.StringIO()
    _cli.info(out=buf)
    line = next(ln for ln in buf.getvalue().splitlines() if ln.split()[:1] == ["numba-cuda"])
    assert "numba_attn[cuda12]" in line and "numba_attn[cuda13]" in line
    assert "NUMBA_CUDA_DRIVER" not in line


def test_cuda_reason_names_the_extras_without_numba_cuda(monkeypatch):
    from numba_attn import cuda as cuda_pkg

    monkeypatch.setattr(cuda_pkg, "numba_cuda_installed", lambda: False)
    why = cuda_pkg._find_reason()
    assert "numba_attn[cuda12]" in why and "numba_attn[cuda13]" in why


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_warmup_compiles_a_variant_and_info_lists_it_as_cached(tmp_path, monkeypatch):
    env = dict(os.environ, NUMBA_ATTN_CACHE_DIR=str(tmp_path))  # the manifest's home
    proc = subprocess.run([sys.executable, "-m", "numba_attn", "warmup", "--only",
                           "float32 forward", "--jobs", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[########################] 1/1  float32 forward:" in proc.stdout
    assert "warmup: 1/1 variants" in proc.stdout
    from numba_attn import _warmup

    used = json.loads((tmp_path / "warmup.json").read_text())
    (entry,) = used.values()
    assert any(q == "flash_forward" for m, q, s in entry["float32 forward"])
    proc = subprocess.run([sys.executable, "-m", "numba_attn", "info"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("float32 "))
    assert "forward cached" in row and "varlen not warmed" in row, proc.stdout
    # an entry whose signature is in no index reads as stale, not cached
    entry["float32 forward"][0][2] = "(nonsense,)"
    (tmp_path / "warmup.json").write_text(json.dumps(used))
    monkeypatch.setenv("NUMBA_ATTN_CACHE_DIR", str(tmp_path))
    assert _warmup.cached_status()["float32 forward"].startswith("stale")


def test_cached_status_says_bfloat16_needs_ml_dtypes(monkeypatch):
    from numba_attn import _warmup

    monkeypatch.setattr(_warmup, "_manifest_path", lambda: "/nonexistent/warmup.json")
    monkeypatch.setattr(_warmup, "_has_ml_dtypes", lambda: False)
    st = _warmup.cached_status()
    assert st["bfloat16 forward"] == "needs ml_dtypes"
    assert st["float32 forward"] == "not warmed"
    monkeypatch.setattr(_warmup, "_has_ml_dtypes", lambda: True)
    assert _warmup.cached_status()["bfloat16 forward"] == "not warmed"
