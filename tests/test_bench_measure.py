"""The bench says how well it measured: spread per row, busy-machine and disturbed
stream-read warnings, derived decode ratios on the fastest samples."""
from __future__ import annotations

import io
import subprocess
import sys
import time

from numba_attn import bench


def test_spread_note_flags_wide_samples_only():
    assert bench.spread_note("row", [1.0, 1.05, 1.1, 1.2]) is None
    msg = bench.spread_note("row_a", [1.0, 1.5, 1.6])  # median 1.5x the fastest
    assert msg and "row_a" in msg and "min 1.00 / median 1.50 / max 1.60" in msg
    assert bench.spread_note("row_b", [1.0, 1.0, 1.0, 2.5])  # one sample far off


def test_busy_note_threshold():
    assert bench.busy_note(None, 4) is None  # not measurable: no claim
    assert bench.busy_note(0.9, 4) is None
    msg = bench.busy_note(1.5, 4)
    assert msg and "1.5 of 4 CPUs" in msg


def test_cpu_share_sees_another_process_and_not_itself():
    share = bench.CpuShare()
    if share.s0 is None:  # not Linux
        return
    # this process spins: its own time is not counted as others'
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        pass
    mine = share.others()
    share = bench.CpuShare()
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt=time.perf_counter()\n"
                              "while time.perf_counter()-t<0.6: pass"])
    child.wait()
    theirs = share.others()
    assert theirs > mine + 0.3, (mine, theirs)


def test_run_bench_reports_spread_and_fastest_sample_ratios(monkeypatch):
    tiny = (bench._decode("tiny_decode", 64), bench._decode("tiny_decode_float16", 64,
                                                           dtype="float16"))
    monkeypatch.setattr(bench, "QUICK_SHAPES", tiny)
    out = io.StringIO()
    res = bench.run_bench(quick=True, peers=(), out=out, err=io.StringIO())
    for r in res["rows"]:
        assert r["min_ms"] <= r["ms"] <= r["max_ms"]
        assert r["stream_ms"] > 0 and r["limit_fraction"] == r["stream_ms"] / r["min_ms"]
    rows = {r["name"]: r for r in res["rows"]}
    d = res["derived"]
    got = d["tiny_decode_float16: speed / float32 cache speed (fastest samples)"]
    assert got == rows["tiny_decode"]["min_ms"] / rows["tiny_decode_float16"]["min_ms"]
    assert d["tiny_decode: fastest time / stream-read time"] == \
        rows["tiny_decode"]["min_ms"] / rows["tiny_decode"]["stream_ms"]
    text = out.getvalue()
    assert "min/max ms" in text
    for r in res["rows"]:
        assert f"{r['min_ms']:.2f}/{r['max_ms']:.2f}" in text
        if r["spread_warning"]:
            assert r["spread_warning"] in text
