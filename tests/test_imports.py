"""The package's import graph has no cycle (issue 18): every ``import`` statement counts,
module level or inside a function. Backends and the CUDA side are reached from below only
through the registry by module path (``dispatch.BACKEND_MODULES``, ``interop.device_op``)."""
from __future__ import annotations

import ast
import os

import numba_attn

ROOT = os.path.dirname(numba_attn.__file__)


def _modules():
    mods = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel[:-9] if rel.endswith(".__init__") else rel] = path
    return mods


def _targets(mods, cur, node):
    pkg = cur if mods[cur].endswith("__init__.py") else cur.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = pkg.split(".")
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                 for a in node.names]
    return {n for n in names if n in mods and n != cur}


def import_graph():
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[m] |= _targets(mods, m, node)
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    edges = [f"{a} -> {b}" for comp in found for a in comp for b in sorted(graph[a])
             if b in comp]
    assert not found, "import cycles:\n  " + "\n  ".join(edges)


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_old_homes_of_the_layers_still_import():
    """layers.py became the numba_attn.layers package (issue 18); mla.py, projections.py and
    training.py moved into it and stay importable as thin re-exports of one object each."""
    from numba_attn import layers, mla, projections, training
    from numba_attn.layers import mha, mha_train, mla as layers_mla, mla_train
    from numba_attn.layers import projections as layers_projections

    assert mla.MultiHeadLatentAttention is layers_mla.MultiHeadLatentAttention
    assert mla.MLACache is layers_mla.MLACache is numba_attn.MLACache
    assert projections.linear is layers_projections.linear is layers.linear is mha.linear
    assert training.linear_backward is layers_projections.linear_backward
    assert training.mha_backward is mha_train.mha_backward
    assert training.mla_forward_train is mla_train.mla_forward_train
    assert layers.MultiHeadAttention is numba_attn.MultiHeadAttention
    for name in ("ParameterMixin", "RotaryTable", "hf_dict", "hf_get", "hf_rope",
                 "to_device_if", "require_cuda", "to_host", "check_hidden", "check_lora",
                 "check_positions", "widen", "GEMV_MAX_TOKENS", "_LORA_TARGETS", "_weight",
                 "_as_mapping", "_HF_LLAMA_LIKE", "_HF_OTHER"):
        assert getattr(layers, name) is not None, name
