"""The asv suites: every benchmarks/bench_*.py imports, every benchmark method has an asv
prefix, params match param_names, and the first (smallest) combination runs once."""
from __future__ import annotations

import importlib
import inspect
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
PREFIXES = ("time_", "peakmem_", "mem_", "track_", "timeraw_")
NOT_BENCHMARKS = {"setup", "teardown", "setup_cache", "make"}


@pytest.fixture
def import_suite(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))

    def load(name):
        return importlib.import_module(f"benchmarks.{name}")
    return load


def suite_classes(mod):
    """Classes defined in ``mod`` that hold asv benchmarks (or derive from the base)."""
    from benchmarks.common import Benchmark

    out = []
    for _, cls in inspect.getmembers(mod, inspect.isclass):
        if cls.__module__ != mod.__name__:
            continue
        if issubclass(cls, Benchmark) or any(n.startswith(PREFIXES) for n in dir(cls)):
            out.append(cls)
    return out


def own_methods(cls):
    """Public callables a suite class adds (the base class' own names excluded)."""
    from benchmarks.common import Benchmark

    base = set(dir(Benchmark))
    return [n for n in dir(cls) if not n.startswith("_") and n not in base
            and callable(getattr(cls, n)) and not inspect.isclass(getattr(cls, n))]


def param_lists(cls):
    params = list(getattr(cls, "params", []) or [])
    if params and not all(isinstance(p, (list, tuple)) for p in params):
        params = [params]  # asv: a flat list is one parameter
    return params


def test_there_are_suites():
    assert "bench_attention" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_suite_methods_have_asv_prefixes_and_params_match(name, import_suite):
    mod = import_suite(name)
    classes = suite_classes(mod)
    assert classes, f"{name}: no benchmark classes"
    for cls in classes:
        methods = own_methods(cls)
        bad = [m for m in methods if not m.startswith(PREFIXES) and m not in NOT_BENCHMARKS]
        assert not bad, f"{name}.{cls.__name__}: methods without an asv prefix: {bad}"
        assert any(m.startswith(PREFIXES) for m in methods), \
            f"{name}.{cls.__name__}: no benchmark method"
        params = param_lists(cls)
        names = list(getattr(cls, "param_names", []) or [])
        if params or names:
            assert len(params) == len(names), \
                f"{name}.{cls.__name__}: {len(params)} params, param_names {names}"
            assert all(len(p) > 0 for p in params), f"{name}.{cls.__name__}: empty params"
        for m in methods:
            if m.startswith(PREFIXES):
                n_args = len(inspect.signature(getattr(cls, m)).parameters) - 1
                assert n_args == len(params), (
                    f"{name}.{cls.__name__}.{m} takes {n_args} parameters, params has "
                    f"{len(params)}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", MODULES)
def test_suite_smallest_combination_runs(name, import_suite):
    mod = import_suite(name)
    t0 = time.perf_counter()
    ran = 0
    for cls in suite_classes(mod):
        params = param_lists(cls)
        args = getattr(cls, "test_params", None)
        args = tuple(args) if args is not None else tuple(p[0] for p in params)
        bench = cls()
        try:
            if hasattr(bench, "setup"):
                bench.setup(*args)
        except NotImplementedError as e:  # asv's skip
            print(f"{cls.__name__}{args}: skipped in setup: {e}")
            continue
        try:
            for m in own_methods(cls):
                if m.startswith(PREFIXES):
                    getattr(bench, m)(*args)
                    ran += 1
        finally:
            if hasattr(bench, "teardown"):
                bench.teardown(*args)
    assert ran > 0, f"{name}: no benchmark ran for the first parameter combination"
    print(f"{name}: {ran} benchmark calls in {time.perf_counter() - t0:.1f}s")


def test_peak_rss_increase_sees_a_new_array(import_suite):
    import sys

    import numpy as np

    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS via /proc is Linux only")
    import_suite("common")
    from benchmarks.common import peak_rss_increase

    size = 64 * 2**20
    got = peak_rss_increase(lambda: np.ones(size // 8))
    assert 0.9 * size <= got <= 2 * size
    assert peak_rss_increase(lambda: None) < size // 4
