"""Every public name shows a real docstring in help() with an example that runs (the
examples themselves run as doctests: pytest collects numba_attn/ with --doctest-modules)."""
from __future__ import annotations

import doctest
import inspect
import pydoc

import pytest

import numba_attn
from numba_attn import compat

PUBLIC = [(numba_attn, n) for n in numba_attn.__all__] + [(compat, n) for n in compat.__all__]


@pytest.mark.parametrize("mod, name", PUBLIC, ids=[f"{m.__name__}.{n}" for m, n in PUBLIC])
def test_public_name_has_a_docstring_with_an_example(mod, name):
    obj = getattr(mod, name)
    doc = obj.__doc__
    assert doc and doc.strip(), f"{name}: no docstring (help() would print nothing)"
    assert "Examples" in doc and ">>>" in doc, f"{name}: no Examples section"
    assert doctest.DocTestFinder().find(obj, name, module=mod, globs={}), name
    text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
    first = inspect.cleandoc(doc).splitlines()[0]
    assert first in text, f"{name}: help() does not show the docstring"


def test_version_has_one_source():
    """pyproject.toml reads the version from numba_attn/_version.py (nothing else sets it)."""
    import tomllib
    from pathlib import Path

    root = Path(numba_attn.__file__).parent.parent
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    attr = meta["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "numba_attn._version.__version__"
    assert numba_attn.__version__ == numba_attn._version.__version__
    assert (root / "numba_attn" / "py.typed").exists()


FUNCS = [(m, n) for m, n in PUBLIC if inspect.isfunction(getattr(m, n))]


@pytest.mark.parametrize("mod, name", FUNCS, ids=[f"{m.__name__}.{n}" for m, n in FUNCS])
def test_public_functions_are_typed(mod, name):
    import typing

    fn = getattr(mod, name)
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
    assert "return" in hints and set(params) <= set(hints), (name, set(params) - set(hints))


def test_asv_builds_only_numba_attns_own_wheel():
    """asv's default build command also drops the dependencies' wheels into the build cache
    and then cannot pick one ("Found multiple wheels"): ours builds with --no-deps."""
    import json
    import re
    from pathlib import Path

    path = Path(numba_attn.__file__).parent.parent / "asv.conf.json"
    conf = json.loads(re.sub(r"^\s*//.*$", "", path.read_text(), flags=re.M))
    (cmd,) = conf["build_command"]
    assert "pip wheel" in cmd and "--no-deps" in cmd and "{build_cache_dir}" in cmd


def test_readme_links_resolve():
    import re
    from pathlib import Path

    root = Path(numba_attn.__file__).parent.parent
    links = re.findall(r"\]\(([^)#:]+)\)", (root / "README.md").read_text())
    assert "docs/DESIGN.md" in links
    for link in links:
        assert (root / link).exists(), link
