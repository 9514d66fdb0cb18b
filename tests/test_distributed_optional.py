"""Dask is an optional extra: numba_attn imports without it, numba_attn.distributed names it."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest


def test_distributed_without_dask_names_the_extra(monkeypatch):
    for name in ("dask", "dask.array", "dask.base", "dask.highlevelgraph"):
        monkeypatch.setitem(sys.modules, name, None)  # "import dask" now fails
    monkeypatch.delitem(sys.modules, "numba_attn.distributed", raising=False)
    with pytest.raises(ImportError, match=r"numba_attn\[distributed\]"):
        importlib.import_module("numba_attn.distributed")


def test_numba_attn_import_does_not_load_dask():
    code = "import sys, numba_attn; print('dask' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), check=True)
    assert res.stdout.strip() == "False"
