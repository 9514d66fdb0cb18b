"""Kernels specialised on a user's ``score_mod`` / ``mask_mod``, cached on disk.

Why not ``cache=True`` on the kernel itself: a parallel kernel that takes a function as an
*argument* has that function's dispatcher in its signature, and Numba refuses to cache it
("uses dynamic globals"; an entry keyed by a function object could never be loaded again
anyway). A kernel that reads the function from a *module global* caches fine: the mod is
inlined into the machine code and nothing of it is needed to load the entry again. So for
each distinct mod, :class:`ModKernel` writes a real ``.py`` file into the cache directory
holding a copy of the kernel's source (``inspect.getsource``, decorators dropped, the
function parameters that receive mods removed, so the body's ``smod`` / ``mmod`` resolve to
module globals), imports it with the kernel module's globals plus the mods, and compiles
it with ``cache=True``: Numba's own disk cache, keyed by that file, the argument types and
the CPU target, does the rest.

Never a stale hit: the file's name is a SHA-256 of everything the compiled code depends on
(:func:`variant_key`): the source of every numba_attn module (the kernels inline helpers
from several), the kernel's name and options, the Numba / llvmlite / NumPy / Python
versions and Numba's CPU target (name and features), and a fingerprint of each mod
(:func:`fingerprint`): its module, bytecode, constants, names, defaults and closure cell values,
and the value of each global it names, recursively for the functions and njit
dispatchers it calls (their code, their globals). Edit the mod, a helper it calls, a
constant it reads or closes over, and the name changes: a new file, a new compile. A
global the fingerprint cannot vouch for (an arbitrary object, a ctypes pointer, a class
outside numpy / numba) makes the mod *uncacheable*: it is then compiled per process as
before (:attr:`ModKernel.fallback`), never cached wrongly. The old files are never read
again; deleting the directory is always safe (``python -m numba_attn info`` shows it).

Within a process a mod's fingerprint is taken once per function object (Numba itself
never recompiles a function whose globals change later), and variants are shared by
function objects with equal fingerprints (a ``lambda`` re-created in a loop compiles once).

Directory: ``$NUMBA_ATTN_CACHE_DIR`` if set, else ``$NUMBA_CACHE_DIR/numba_attn_mods`` when
Numba's cache directory is set, else ``~/.cache/numba_attn/mods`` (``$XDG_CACHE_HOME``).
Where it cannot be written, mods are compiled per process (no error).
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import inspect
import os
import sys
import tempfile
import textwrap
import threading
import types as pytypes
import weakref

import numba
import numpy as np

__all__ = ["ModKernel", "cache_dir", "fingerprint", "variant_key", "Uncacheable"]

_PKG = os.path.dirname(os.path.abspath(__file__))


class Uncacheable(Exception):
    """A mod whose fingerprint cannot be trusted (the message says which global)."""


def cache_dir() -> str:
    """The directory of the generated variant files (see the module docstring)."""
    d = os.environ.get("NUMBA_ATTN_CACHE_DIR")
    if d:
        return os.path.abspath(os.path.expanduser(d))
    nc = os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR
    if nc:
        return os.path.join(os.path.abspath(os.path.expanduser(nc)), "numba_attn_mods")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "numba_attn", "mods")


# ---------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------
_STABLE_MODULES = {"builtins", "math", "cmath", "operator", "numpy", "numba", "llvmlite"}
_SCALARS = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis))


def _stable(mod_name) -> bool:
    return (mod_name or "").split(".")[0] in _STABLE_MODULES


def _code_names(code, acc):
    acc.update(code.co_names)
    for c in code.co_consts:
        if isinstance(c, pytypes.CodeType):
            _code_names(c, acc)
    return acc


def _code(c):
    consts = tuple(_code(x) if isinstance(x, pytypes.CodeType) else _const(x)
                   for x in c.co_consts)
    return ("code", c.co_code, c.co_argcount, c.co_posonlyargcount, c.co_kwonlyargcount,
            c.co_flags, c.co_names, c.co_varnames, c.co_freevars, c.co_cellvars,
            getattr(c, "co_exceptiontable", b""), consts)


def _const(x):
    if isinstance(x, (tuple, frozenset)):
        return (type(x).__name__,) + tuple(_const(y) for y in x)
    return (type(x).__name__, repr(x))


def _array(a):
    a = np.ascontiguousarray(a)
    return ("array", a.dtype.str, a.shape, hashlib.sha256(a.view(np.uint8).data
                                                           if a.size else b"").hexdigest())


def _value(v, where, seen, names):
    """A hashable description of a global / cell / default value ``v`` (reached by
    ``where``); raises Uncacheable for values it cannot describe faithfully."""
    if isinstance(v, _SCALARS):
        return (type(v).__name__, repr(v))
    if isinstance(v, np.generic):
        return ("npscalar", v.dtype.str, repr(v.item()))
    if isinstance(v, np.dtype):
        return ("dtype", v.str)
    if isinstance(v, np.ndarray):
        return _array(v)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__,) + tuple(_value(x, f"{where}[{i}]", seen, names)
                                           for i, x in enumerate(v))
    if isinstance(v, numba.core.dispatcher.Dispatcher):
        opts = tuple(sorted((k, repr(sorted(o) if isinstance(o, (set, frozenset)) else o))
                            for k, o in v.targetoptions.items()))
        return ("njit", type(v).__name__, opts, _function(v.py_func, where, seen))
    if isinstance(v, pytypes.FunctionType):
        return _function(v, where, seen)
    if isinstance(v, pytypes.ModuleType):
        if _stable(v.__name__):
            root = sys.modules.get(v.__name__.split(".")[0])
            return ("module", v.__name__, getattr(root, "__version__", ""))
        # a user's module: the attributes the code could read through it
        return ("module", v.__name__) + tuple(
            (n, _value(getattr(v, n), f"{where}.{n}", seen, names)) for n in sorted(names)
            if hasattr(v, n) and not isinstance(getattr(v, n), pytypes.ModuleType))
    if isinstance(v, np.ufunc):
        return ("ufunc", v.__name__)
    if isinstance(v, (pytypes.BuiltinFunctionType, type)) and _stable(
            getattr(v, "__module__", None)):
        return ("builtin", v.__module__, getattr(v, "__qualname__", repr(v)))
    if hasattr(v, "_defn") and type(v).__module__.startswith("numba"):  # @intrinsic
        return ("intrinsic", _function(v._defn, where, seen))
    py = getattr(getattr(v, "_dispatcher", None), "py_func", None)  # @vectorize (DUFunc)
    if isinstance(py, pytypes.FunctionType):
        return ("dufunc", _function(py, where, seen))
    raise Uncacheable(f"{where} is a {type(v).__module__}.{type(v).__qualname__}, which "
                      "the mod cache cannot fingerprint")


def _function(fn, where, seen):
    if id(fn) in seen:
        return ("recursion", fn.__qualname__)
    seen = seen | {id(fn)}
    code = fn.__code__
    names = _code_names(code, set())
    glb = fn.__globals__
    refs = []
    for n in sorted(names):
        if n in glb:
            refs.append((n, _value(glb[n], f"{fn.__qualname__}: global {n}", seen, names)))
        elif hasattr(builtins, n):
            refs.append((n, "builtin"))
    cells = tuple((n, _value(c.cell_contents, f"{fn.__qualname__}: closure {n}", seen, names))
                  for n, c in zip(code.co_freevars, fn.__closure__ or ()))
    defaults = _value(fn.__defaults__ or (), f"{fn.__qualname__}: defaults", seen, names)
    kwd = tuple(sorted((k, _value(x, f"{fn.__qualname__}: default {k}", seen, names))
                       for k, x in (fn.__kwdefaults__ or {}).items()))
    # the module too: a compiled mod's environment is pickled by its module's name, so
    # equal code from two modules must not share an entry (one may not import elsewhere)
    return ("function", fn.__module__, _code(code), tuple(refs), cells, defaults, kwd)


_FPS = weakref.WeakKeyDictionary()  # function / dispatcher -> fingerprint (or Uncacheable)


def fingerprint(fn) -> str:
    """SHA-256 (hex) of what a mod's compiled code depends on (see the module docstring);
    raises :class:`Uncacheable`. Memoised per function object."""
    got = _FPS.get(fn)
    if got is None:
        try:
            desc = _value(fn, getattr(fn, "__qualname__", "mod"), frozenset(), set())
            got = hashlib.sha256(repr(desc).encode()).hexdigest()
        except Uncacheable as e:
            got = e
        except RecursionError:
            got = Uncacheable("too deeply nested to fingerprint")
        try:
            _FPS[fn] = got
        except TypeError:  # not weakly referenceable
            pass
    if isinstance(got, Uncacheable):
        raise got
    return got


_SOURCES = None


def _sources_hash() -> str:
    """SHA-256 of every numba_attn Python source (cuda/ excluded): a kernel inlines
    helpers from several modules, and Numba's cache sees only the file it is keyed on."""
    global _SOURCES
    if _SOURCES is None:
        h = hashlib.sha256()
        for sub in ("", "cpu"):
            d = os.path.join(_PKG, sub)
            for name in sorted(os.listdir(d)):
                if name.endswith(".py"):
                    with open(os.path.join(d, name), "rb") as f:
                        h.update(name.encode() + b"\0" + f.read() + b"\0")
        _SOURCES = h.hexdigest()
    return _SOURCES


def _target() -> tuple:
    from numba.core.registry import cpu_target

    return tuple(str(x) for x in cpu_target.target_context.codegen().magic_tuple())


def variant_key(kernel, fps) -> str:
    """SHA-256 (hex) naming one variant: ``kernel`` (a Numba dispatcher) with the mods
    whose fingerprints are ``fps`` (None for an absent one)."""
    import llvmlite

    py = kernel.py_func
    opts = tuple(sorted((k, repr(sorted(o) if isinstance(o, (set, frozenset)) else o))
                        for k, o in kernel.targetoptions.items()))
    desc = (py.__module__, py.__qualname__, opts, tuple(fps), _sources_hash(), _target(),
            numba.__version__, llvmlite.__version__, np.__version__, sys.version,
            os.environ.get("NUMBA_OPT", ""), "v1")
    return hashlib.sha256(repr(desc).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# generated variants
# ---------------------------------------------------------------------------------------
_PENDING = {}  # module name -> globals for the variant module being imported
_LOCK = threading.Lock()


def _variant_env(name):
    """Called by a generated file: its globals (the kernel module's + the mods)."""
    return _PENDING.pop(name)


def _parse(py):
    tree = ast.parse(textwrap.dedent(inspect.getsource(py)))
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef) or fdef.name != py.__name__:
        raise Uncacheable(f"{py.__qualname__}: source not found")
    a = fdef.args
    if a.defaults or a.kwonlyargs or a.vararg or a.kwarg or a.posonlyargs:
        raise Uncacheable(f"{py.__qualname__}: only plain positional parameters supported")
    fdef.decorator_list = []
    return fdef


class _Specialise(ast.NodeTransformer):
    """Rewrites one function of the kernel's module for mods held in module globals.

    ``rename`` maps the function's parameters that receive a mod to the global's name.
    Those parameters are removed; ``g is None`` / ``g is not None`` fold to constants;
    a call ``helper(..., g, ...)`` of a helper of the same module becomes a call of a
    specialised copy of the helper without that parameter (generated recursively). A
    Dispatcher passed as an argument, or compared with None, is lowered as a constant
    holding the function object's address, which Numba refuses to cache ("dynamic
    globals"); read straight from a global and called, it is not.
    """

    def __init__(self, rename, home, out):
        self.rename, self.home, self.out = rename, home, out

    def visit_Name(self, node):
        if node.id in self.rename:
            node.id = self.rename[node.id]
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        g = set(self.rename.values())
        if (len(node.ops) == 1 and isinstance(node.left, ast.Name) and node.left.id in g
                and isinstance(node.comparators[0], ast.Constant)
                and node.comparators[0].value is None
                and isinstance(node.ops[0], (ast.Is, ast.IsNot))):
            return ast.copy_location(ast.Constant(isinstance(node.ops[0], ast.IsNot)), node)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        g = set(self.rename.values())
        pos = [i for i, x in enumerate(node.args) if isinstance(x, ast.Name) and x.id in g]
        if not pos:
            return node
        if not isinstance(node.func, ast.Name):
            raise Uncacheable(f"a mod passed to {ast.unparse(node.func)}")
        fn = self.home.get(node.func.id)
        fn = getattr(fn, "py_func", fn)
        if not isinstance(fn, pytypes.FunctionType) or fn.__module__ != self.home["__name__"]:
            raise Uncacheable(f"a mod passed to {node.func.id}, not a function of "
                              f"{self.home['__name__']}")
        params = list(inspect.signature(fn).parameters)
        sub = {params[i]: node.args[i].id for i in pos}
        name = fn.__name__ + "__" + "_".join(f"{k}_{v}" for k, v in sorted(sub.items()))
        if name not in self.out:
            self.out[name] = None  # recursion guard
            self.out[name] = _specialised(fn, sub, self.home, self.out, name)
        node.func.id = name
        node.args = [x for i, x in enumerate(node.args) if i not in pos]
        return node


def _specialised(py, rename, home, out, name):
    fdef = _parse(py)
    fdef.args.args = [x for x in fdef.args.args if x.arg not in rename]
    fdef = _Specialise(rename, home, out).visit(fdef)
    fdef.name = name
    return ast.unparse(ast.fix_missing_locations(fdef))


def _variant_source(py, drop, home, header):
    """Source of the generated module: the kernel ``py`` with the parameters in ``drop``
    (names that become globals) removed, and the helpers they reach specialised."""
    out = {}
    top = _specialised(py, {n: n for n in drop}, home, out, py.__name__)
    helpers = [f"@_register_jitable\n{src}" for src in out.values()]
    return "\n\n".join([header] + helpers + [top]) + "\n"


def _write_once(path, text):
    """Create ``path`` with ``text`` unless it exists (atomic; never rewrites a file, so
    Numba's index, which records the file's time stamp, stays valid)."""
    if os.path.exists(path):
        return
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)  # fails if another process made it first: keep theirs
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _options(kernel):
    return {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}


class ModKernel:
    """A parallel kernel of numba_attn for calls with user mods, cached on disk per mod.

    Called like the kernel (positional arguments, the mods among them as dispatchers or
    None). Each distinct combination of mods gets a variant (see the module docstring);
    ``fallback`` serves uncacheable mods, compiled per process.
    """

    def __init__(self, kernel, mod_params=("smod", "sgrad", "mmod")):
        self.kernel = kernel
        py = kernel.py_func
        names = list(inspect.signature(py).parameters)
        self.params = names
        self.mod_pos = tuple(i for i, n in enumerate(names) if n in mod_params)
        self.fallback = numba.njit(**_options(kernel), cache=False)(py)
        self._variants = {}  # fingerprints -> dispatcher of the variant
        self.last = None  # (how, path): how the last new variant was obtained

    @property
    def name(self):
        return f"{self.kernel.py_func.__module__}.{self.kernel.py_func.__qualname__}"

    def __call__(self, *args):
        fns = tuple(args[i] for i in self.mod_pos)
        try:
            fps = tuple(None if f is None else fingerprint(f) for f in fns)
        except Uncacheable:
            return self.fallback(*args)
        var = self._variants.get(fps)
        if var is None:
            with _LOCK:
                var = self._variants.get(fps)
                if var is None:
                    var = self._variant(fns, fps)
                    self._variants[fps] = var
        if var is self.fallback:
            return var(*args)
        skip = {i for i, f in zip(self.mod_pos, fns) if f is not None}
        try:
            return var(*(a for i, a in enumerate(args) if i not in skip))
        except ImportError as e:  # an entry whose pickled environment cannot load here
            self._variants[fps] = self.fallback
            self.last = (f"per process (the cached variant did not load: {e})", None)
            return self.fallback(*args)

    def _variant(self, fns, fps):
        py = self.kernel.py_func
        key = variant_key(self.kernel, fps)
        modname = f"numba_attn_mod_{py.__name__}_{key[:24]}"
        path = os.path.join(cache_dir(), modname + ".py")
        drop = {self.params[i]: f for i, f in zip(self.mod_pos, fns) if f is not None}
        shown = ", ".join(f"{n}={getattr(f, '__module__', '?')}."
                          f"{getattr(f, '__qualname__', f)}" for n, f in drop.items())
        header = (f"# Generated by numba_attn.mods: {self.name} with {shown}\n"
                  f"# key {key}; safe to delete (recompiled when needed)\n"
                  f"import numba_attn._modcache as _mc\n"
                  f"globals().update(_mc._variant_env(__name__))\n"
                  f"del _mc\n"
                  f"from numba.extending import register_jitable as _register_jitable\n")
        home = sys.modules[py.__module__]
        try:
            _write_once(path, _variant_source(py, drop, vars(home), header))
        except (OSError, Uncacheable) as e:
            self.last = (f"per process ({e})", None)
            return self.fallback
        env = {k: v for k, v in vars(home).items() if not k.startswith("__")}
        env.update(drop)
        mod = sys.modules.get(modname)
        if mod is None:
            spec = importlib.util.spec_from_file_location(modname, path)
            mod = importlib.util.module_from_spec(spec)
            _PENDING[modname] = env
            sys.modules[modname] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(modname, None)
                _PENDING.pop(modname, None)
                raise
        self.last = ("disk", path)
        return numba.njit(**_options(self.kernel), cache=True)(getattr(mod, py.__name__))

    def variants(self):
        """The variants of this process: (fingerprints, dispatcher) pairs."""
        return list(self._variants.items())


def cached_variants():
    """[(file name, size in bytes, first comment line)] of the generated variant files."""
    d = cache_dir()
    out = []
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return out
    for n in names:
        if n.startswith("numba_attn_mod_") and n.endswith(".py"):
            p = os.path.join(d, n)
            try:
                with open(p) as f:
                    first = f.readline().strip("# \n")
                out.append((n, os.path.getsize(p), first))
            except OSError:
                pass
    return out
