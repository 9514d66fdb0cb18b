"""The split-KV decode kernel at its tile, split, row-block, lane and page edges, every
cache dtype, against the reference (tests/decode_edge_cases.py, in a child process)."""
from __future__ import annotations

import os
import subprocess
import sys

import property_cases as pc
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.timeout(900)
def test_decode_edges_match_reference():
    cmd = [sys.executable, os.path.join(HERE, "decode_edge_cases.py"), "decode_edges",
           "--examples", "40", "--keep-going"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=850)
    text = r.stdout + r.stderr
    assert r.returncode == 0, pc.report(r.returncode, text)
    assert "DONE decode_edges: 0 failing" in text, pc.report(r.returncode, text)
