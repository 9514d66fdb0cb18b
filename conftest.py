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

# whole modules in the slow tier: each spends minutes in child processes or simulators, or
# compiles a kernel variant per user mod (seconds to tens of seconds each, cold)
SLOW_MODULES = {
    "test_properties.py",          # hypothesis examples of every operation, child processes
    "test_cuda_simulator.py",      # the CUDA kernels under the simulator (Python speed)
    "test_distributed.py",         # dask graphs
    "test_distributed_optional.py",
    "test_train_example.py",       # runs examples/train_tiny_lm.py
    "test_minilm.py",              # a real model end to end
    "test_benchmark_suites.py",    # the asv / bench suites
    "test_compile_threads.py",     # cold compiles in child processes
    "test_mods.py",                # a forward variant per mod
    "test_backward_mods.py",       # forward + dq + dk/dv variants per mod
}
# single tests (node ids ending so) in the slow tier, and those of the slow modules kept in
# the quick one so that every feature keeps its core there
SLOW_TESTS = (
    "numba_attn/mods.py::numba_attn.mods",  # the module doctest compiles five mods
    "test_register_picks_the_threading_layer_before_numbas_threads_start[default]",
    "test_register_picks_the_threading_layer_before_numbas_threads_start[user-choice]",
)
QUICK_TESTS = (
    "test_mods.py::test_t5_relative_bias_matches_reference[float32]",
    "test_backward_mods.py::test_gradients_match_finite_differences_of_the_forward",
)


def pytest_collection_modifyitems(config, items):
    import pytest

    slow = pytest.mark.slow
    for item in items:
        nodeid = item.nodeid
        if nodeid.endswith(QUICK_TESTS):
            continue
        if os.path.basename(str(item.fspath)) in SLOW_MODULES or nodeid.endswith(SLOW_TESTS):
            item.add_marker(slow)
