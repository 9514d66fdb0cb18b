"""Repository-root pytest configuration: ``python -m pytest`` collects the tests in tests/
and the doctests of every numba_attn module (pyproject's testpaths)."""
try:  # the CUDA modules import numba-cuda at module level
    from numba import cuda as _cuda  # noqa: F401
except ImportError:
    collect_ignore_glob = ["numba_attn/cuda/*.py"]
