"""Repository-root pytest configuration: ``python -m pytest`` collects the tests in tests/
and the doctests of every numba_attn module (pyproject's testpaths).

Quick tier: ``python -m pytest -m "not slow"`` leaves out the tests marked ``slow`` here
and in the test files (child processes that compile from scratch, hypothesis property
runs, the CUDA simulator, dask, the example scripts); the full ``python -m pytest`` (what
CI runs) is unchanged."""
import os

try:  # the CUDA modules import numba-cuda at module level
    from numba import cuda as _cuda  # noqa: F401
except ImportError:
    collect_ignore_glob = ["numba_attn/cuda/*.py"]

# whole modules in the slow tier: each spends minutes in child processes or simulators
SLOW_MODULES = {
    "test_properties.py",          # hypothesis examples of every operation, child processes
    "test_cuda_simulator.py",      # the CUDA kernels under the simulator (Python speed)
    "test_distributed.py",         # dask graphs
    "test_distributed_optional.py",
    "test_train_example.py",       # runs examples/train_tiny_lm.py
    "test_minilm.py",              # a real model end to end
    "test_benchmark_suites.py",    # the asv / bench suites
    "test_compile_threads.py",     # cold compiles in child processes
}


def pytest_collection_modifyitems(config, items):
    import pytest

    slow = pytest.mark.slow
    for item in items:
        if os.path.basename(str(item.fspath)) in SLOW_MODULES:
            item.add_marker(slow)
