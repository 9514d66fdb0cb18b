"""Validation, canonicalisation and backend choice: the one Python layer over the kernels.

Public functions build a :class:`Problem` (packed, canonical arrays + the config) with the
helpers here, then :func:`run` hands it to a backend. Backends declare what they cannot
do (``not_supported_reasons``), xformers-style; ``auto`` picks the first that can serve.
Kernels may assume everything checked here.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from .config import AttentionConfig, AttentionError, BackendUnavailable
from .interop import _bfloat16, _is_bfloat16, device_op, to_numpy

__all__ = ["Problem", "run", "available_backends", "get_backend", "BACKENDS"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))




# ---------------------------------------------------------------------------------------
# array helpers (host and device arrays alike: only .shape / .dtype / .ndim are used)
# ---------------------------------------------------------------------------------------
def array_device(x) -> str:
    """``"cuda"`` for device arrays (CUDA array interface, DLPack on a GPU), else ``"cpu"``."""
    if type(x) is np.ndarray:
        return "cpu"
    if hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host"):
        return "cuda"  # copy_to_host: numba device arrays, the CUDA simulator's included
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None and not isinstance(x, np.ndarray):
        try:
            return "cuda" if int(dev()[0]) in (2, 3, 13) else "cpu"  # kDLCUDA, host, managed
        except Exception:
            return "cpu"
    return "cpu"


def as_np_dtype(dt) -> np.dtype:
    """numpy dtype of an array's ``.dtype`` (numpy, CuPy, numba, or torch's ``torch.float32``)."""
    try:
        return np.dtype(dt)
    except TypeError:
        name = str(dt).rsplit(".", 1)[-1]  # torch.float16 -> float16
        if name == "bfloat16" and _bfloat16() is not None:
            return _bfloat16()
        try:
            return np.dtype(name)
        except TypeError:
            raise TypeError(f"unsupported dtype {dt}") from None


def check_float(name, x):
    if _is_bfloat16(x.dtype) and _bfloat16() is None:
        raise TypeError(f"{name}: bfloat16 needs ml_dtypes (pip install ml_dtypes); or pass "
                        f"float16, float32 or float64")
    try:
        dt = as_np_dtype(x.dtype)
    except TypeError:
        raise TypeError(f"{name}: unsupported dtype {x.dtype}; expected float16, bfloat16, "
                        "float32 or float64") from None
    if dt not in _FLOATS and not (_is_bfloat16(dt) and dt == _bfloat16()):
        raise TypeError(
            f"{name}: unsupported dtype {dt}; expected float16, bfloat16, float32 or float64"
        )
    return dt


def check_rank(name, x, ndim, layout):
    if x is None:
        raise AttentionError(f"{name}: required, expected an array of shape {layout}")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array of shape {layout}, got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise AttentionError(
            f"{name}: expected {ndim}-D {layout}, got shape {tuple(x.shape)}"
        )


def same(names_values, what):
    """All values equal, else an error naming each argument's value."""
    vals = [v for _, v in names_values]
    if any(v != vals[0] for v in vals):
        detail = ", ".join(f"{n}={v}" for n, v in names_values)
        raise AttentionError(f"{what} must match: {detail}")


def compute_dtype(dt) -> np.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return np.dtype(np.float64) if np.dtype(dt) == np.float64 else np.dtype(np.float32)


def lse_dtype(dt) -> np.dtype:
    return compute_dtype(dt)


def host(name, x, dtype=None):
    """A C-contiguous, writeable numpy array of ``dtype`` (copies only when needed).

    Read-only inputs (``np.load(mmap_mode="r")``, ``np.frombuffer``) are copied: Numba
    types read-only arrays apart and would compile a second kernel variant for them.

    Small optional inputs (kv_lens, cu_seqlens, sinks, alibi_slopes: their values are
    checked) given as device arrays are copied to the host for validation; device bias
    and mask of a device problem stay on the device (:func:`strided_operand`); q/k/v
    device mixing is rejected earlier, in ``functional.canon_qkv``.
    """
    if array_device(x) != "cpu":
        x = x.copy_to_host() if hasattr(x, "copy_to_host") else (
            x.get() if hasattr(x, "get") else to_numpy(name, x.cpu()))
    x = to_numpy(name, x)
    if dtype is not None and x.dtype.kind not in "biuf" and not _is_bfloat16(x.dtype):
        raise TypeError(f"{name}: expected a real-valued array, got dtype {x.dtype}")
    out = np.ascontiguousarray(x, dtype=dtype)
    if not out.flags.writeable:  # read-only is another Numba type: a second compile
        out = out.copy()
    return out


_KINDS = {"f": "float", "i": "signed int", "u": "unsigned int", "b": "bool"}


def host_operand(name, x, kinds, what):
    """A host numpy array of an optional input whose dtype kind is in ``kinds``.

    Complex, object, string and other dtypes raise ``TypeError`` naming ``name`` instead
    of being cast (complex silently losing its imaginary part, objects becoming NaN).
    """
    a = host(name, x)
    if a.dtype.kind not in kinds and not (_is_bfloat16(a.dtype) and "f" in kinds):
        raise TypeError(f"{name}: expected {what}, got dtype {a.dtype}")
    return a


BIAS_WHAT = "a real (float or int) array; pass a boolean mask as mask="
MASK_WHAT = ("a boolean array (True = may attend); use mask.astype(bool) or pass it as "
             "bias")


def broadcast_4d(name, shape, full_shape):
    """``shape`` padded to 4-D, or an error naming ``name`` when it does not broadcast to
    ``full_shape`` (b, h, sq, sk)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) > 4:
        raise AttentionError(f"{name}: at most 4-D (batch, heads, seqlen_q, seqlen_k), "
                             f"got shape {shape}")
    shape4 = (1,) * (4 - len(shape)) + shape
    axes = ("batch", "heads", "seqlen_q", "seqlen_k")
    for ax, n, want in zip(axes, shape4, full_shape):
        if n != 1 and n != want:
            raise AttentionError(
                f"{name}: shape {shape} does not broadcast to (batch, heads, seqlen_q, "
                f"seqlen_k) = {tuple(full_shape)} (axis {ax} is {n}, expected 1 or {want})"
            )
    return shape4


def strided_operand(name, x, full_shape, dtype, device="cpu"):
    """Validate a bias/mask broadcastable to ``full_shape`` (b, h, sq, sk).

    Returns (flat contiguous array, int64 element strides with 0 on broadcast axes).
    Trailing axes align as numpy broadcasting does. A device array of a device problem
    (``device="cuda"``) is checked from its shape and dtype only and stays on the device
    (cast or made contiguous there when needed).
    """
    if device == "cuda" and array_device(x) == "cuda":
        got = device_op("strided_operand")(name, x, full_shape, dtype)
        if got is not None:
            return got
    if dtype == np.bool_:
        x = host_operand(name, x, "b", MASK_WHAT)
    else:
        x = host_operand(name, x, "fiu", BIAS_WHAT)
    shape = broadcast_4d(name, x.shape, full_shape)
    x = np.ascontiguousarray(x.reshape(shape), dtype=dtype)
    strides = np.array([0 if n == 1 else s // x.itemsize for n, s in zip(shape, x.strides)],
                       dtype=np.int64)
    return x.reshape(-1), strides


def check_sinks(sinks, h, dtype):
    if sinks is None:
        return None
    s = host_operand("sinks", sinks, "fiu", "a real array")
    if s.shape != (h,):
        raise AttentionError(f"sinks: expected shape (num_heads,) = ({h},), got {s.shape}")
    s = s.astype(dtype)
    if not np.all(np.isfinite(s)):
        raise AttentionError("sinks: must be finite")
    return s


def check_alibi(slopes, batch, h, dtype):
    if slopes is None:
        return None
    s = host_operand("alibi_slopes", slopes, "fiu", "a real array")
    if s.shape == (h,):
        s = s.reshape(1, h)
    elif s.shape != (batch, h):
        raise AttentionError(f"alibi_slopes: expected shape (num_heads,) = ({h},) or "
                             f"(batch, num_heads) = ({batch}, {h}), got {s.shape}")
    s = np.ascontiguousarray(s, dtype=dtype)
    if not np.all(np.isfinite(s)):
        raise AttentionError("alibi_slopes: must be finite")
    return s


def check_int_vector(name, x, length, lo, hi):
    a = host_operand(name, x, "iu", "an integer array")
    if a.shape != (length,):
        raise AttentionError(f"{name}: expected shape ({length},), got {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
    a = a.astype(np.int64)
    bad = (a < lo) | (a > hi)
    if bad.any():
        i = int(np.argmax(bad))
        raise AttentionError(f"{name}: entries must lie in [{lo}, {hi}], got {name}[{i}] = {a[i]}")
    return a


# ---------------------------------------------------------------------------------------
# the canonical problem every backend receives
# ---------------------------------------------------------------------------------------
CONTIGUOUS_BLOCK = 1 << 40  # "block size" of a contiguous store: one block per row


@dataclass
class Problem:
    """A validated, canonical attention problem.

    q (Tq, H, D), k (N, Hkv, D), v (N, Hkv, Dv) in the compute dtype; ``rows`` int64
    (batch, 5) = (q_start, q_len, k_start, visible k_len, offset); key ``j`` of row ``b`` is
    storage row ``k_start + block_table[b, j // block_size] * block_size + j % block_size``.
    bias/mask are flat arrays with int64 element strides over (b, h, i, j) in-row positions.
    """

    config: AttentionConfig
    q: object
    k: object
    v: object
    rows: np.ndarray
    block_table: np.ndarray
    block_size: int
    max_seqlen_q: int
    max_seqlen_k: int
    out_dtype: np.dtype
    slopes: object = None
    bias: object = None
    bias_strides: object = None
    mask: object = None
    mask_strides: object = None
    sinks: object = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def batch(self):
        return self.rows.shape[0]

    @property
    def compute_dtype(self):
        return compute_dtype(self.out_dtype)


# ---------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------
class Backend:
    """What a backend must say: ``unavailable_reason()`` and ``not_supported_reasons(p)``."""

    name = "?"
    device = "cpu"

    def unavailable_reason(self):
        return None

    def not_supported_reasons(self, problem) -> list:
        reasons = []
        if problem.device != self.device:
            reasons.append(f"data lives on {problem.device!r}, backend runs on {self.device!r}")
        return reasons

    def run(self, problem):  # -> (out (Tq, H, Dv), lse (Tq, H)) in the compute dtype
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"
    device = "cpu"

    def not_supported_reasons(self, problem):
        return []  # copies device data to the host

    def run(self, problem):
        from .reference_problem import run_problem

        return run_problem(problem)


# The registry: each backend's module defines its class and registers an instance on
# import. Modules are found by path and imported the first time a backend is asked for,
# so this module (below every backend) never imports one: no import cycle, no CUDA import
# on a CPU-only call.
BACKEND_MODULES = {"cpu": "numba_attn.cpu", "cuda": "numba_attn.cuda"}
BACKENDS = {"reference": ReferenceBackend()}
_AUTO_ORDER = ("cuda", "cpu")


def register_backend(backend):
    """Add a backend (numba_attn.cpu and numba_attn.cuda register theirs on import)."""
    BACKENDS[backend.name] = backend


def _load_backend(name):
    """Import the module of backend ``name`` (by path) when it is not registered yet."""
    if name not in BACKENDS and name in BACKEND_MODULES:
        import importlib

        try:
            importlib.import_module(BACKEND_MODULES[name])
        except ImportError:
            if name == "cpu":
                raise
    return BACKENDS.get(name)


def get_backend(name):
    be = _load_backend(name) if isinstance(name, str) else None
    if be is None:
        raise AttentionError(f"backend: unknown {name!r}; expected 'auto' or one of "
                             f"{sorted(set(BACKENDS) | set(BACKEND_MODULES))}")
    return be


def available_backends() -> dict:
    """``{name: None}`` for each usable backend, ``{name: "reason"}`` for the others.

    Examples
    --------
    >>> import numba_attn
    >>> reasons = numba_attn.available_backends()
    >>> reasons["cpu"] is None and reasons["reference"] is None
    True
    >>> sorted(reasons)[:2]
    ['cpu', 'cuda']
    """
    _load_optional_backends()
    return {name: b.unavailable_reason() for name, b in BACKENDS.items()}


_optional_loaded = threading.Event()


def _load_optional_backends():
    if _optional_loaded.is_set():
        return
    for name in BACKEND_MODULES:
        _load_backend(name)
    _optional_loaded.set()


def select(problem, backend="auto"):
    """The backend that will run ``problem``, or an error listing why none can."""
    _load_optional_backends()
    if backend != "auto":
        be = get_backend(backend)
        why = be.unavailable_reason()
        reasons = [why] if why else be.not_supported_reasons(problem)
        if reasons:
            raise BackendUnavailable(f"backend {backend!r} cannot serve this call: "
                                     + "; ".join(reasons))
        return be
    tried = []
    for name in _AUTO_ORDER:
        be = BACKENDS.get(name)
        if be is None:
            continue
        if be.device != problem.device:  # auto runs where the data lives
            tried.append(f"{name}: data lives on {problem.device!r}, backend runs on "
                         f"{be.device!r}")
            continue
        why = be.unavailable_reason()
        reasons = [why] if why else be.not_supported_reasons(problem)
        if not reasons:
            return be
        tried.append(f"{name}: " + "; ".join(reasons))
    raise BackendUnavailable("no backend can serve this call:\n  " + "\n  ".join(tried))


def run(problem, backend="auto"):
    """Run ``problem`` on the chosen backend; returns (out, lse) in the compute dtype."""
    return select(problem, backend).run(problem)
