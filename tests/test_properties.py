"""Property-based tests: every operation against numba_attn.reference on configurations
drawn by hypothesis from the whole option space (tests/property_cases.py).

Each operation runs in a child process, so a crash fails the test with the configuration
that caused it instead of killing the suite. CI runs a fixed, derandomised set of
examples within a few minutes; ``NUMBA_ATTN_PROPERTIES=deep`` runs twenty times as many
(and ``NUMBA_ATTN_PROPERTIES_SEED=N`` draws another set), for hunting by hand::

    NUMBA_ATTN_PROPERTIES=deep python -m pytest tests/test_properties.py -q
"""
from __future__ import annotations

import os

import property_cases as pc
import pytest

# examples per operation in CI; cheap operations get more
EXAMPLES = {"forward": 80, "backward": 80, "varlen": 40, "varlen_backward": 50, "kvcache": 40,
            "backward_mods": 30, "layer_backward": 60}
DEEP = os.environ.get("NUMBA_ATTN_PROPERTIES", "") == "deep"
SEED = int(os.environ.get("NUMBA_ATTN_PROPERTIES_SEED", "0"))


@pytest.mark.timeout(3600 if DEEP else 900)
@pytest.mark.parametrize("operation", sorted(EXAMPLES))
def test_operation_matches_reference(operation):
    n = EXAMPLES[operation] * (20 if DEEP else 1)
    rc, text = pc.spawn(operation, "--examples", n, "--seed", SEED, "--keep-going",
                        timeout=3500 if DEEP else 850)
    assert rc == 0, pc.report(rc, text)
    assert f"DONE {operation}: 0 failing" in text, pc.report(rc, text)
