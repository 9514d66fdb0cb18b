"""Array types in and out: the one place that knows about torch CPU tensors.

Every entry point reads host inputs through :func:`to_numpy` (numpy arrays as they are,
torch CPU tensors as zero-copy numpy views: detached, bfloat16 through ml_dtypes) and
returns results through :func:`like` (numpy in, numpy out; torch in, torch out, zero-copy).
torch is never imported here: a tensor is recognised by its type's module, and
``sys.modules["torch"]`` is used only when such a tensor was given.
Device arrays (CUDA, CuPy, torch on a GPU) are handled by :mod:`numba_attn.cuda`.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["Array", "is_torch", "to_numpy", "like", "device_op", "lse_bhs", "lse_ht",
           "like_device", "merge_result"]


def is_torch(x) -> bool:
    """True for a ``torch.Tensor`` (any device), without importing torch.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn.interop import is_torch
    >>> is_torch(np.zeros(3))
    False
    """
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


_BF16 = []


def _bfloat16():
    """ml_dtypes' bfloat16 dtype, or None without ml_dtypes. Imported on first need only
    (the import costs ~0.1-0.5 s: never on a float32 call)."""
    if not _BF16:
        try:
            import ml_dtypes

            _BF16.append(np.dtype(ml_dtypes.bfloat16))
        except ImportError:  # optional
            _BF16.append(None)
    return _BF16[0]


def _is_bfloat16(dt) -> bool:
    """Whether a dtype (numpy, ml_dtypes, torch) is bfloat16, without importing ml_dtypes."""
    return str(dt).rsplit(".", 1)[-1] == "bfloat16"


def to_numpy(name, x) -> np.ndarray:
    """A host numpy array viewing ``x`` (no copy for numpy arrays and torch CPU tensors).

    Parameters
    ----------
    name : str
        The argument's name, for error messages.
    x : numpy array, torch CPU tensor, or anything ``np.asarray`` reads
        torch tensors are detached first (``requires_grad`` is fine); bfloat16 tensors
        become ``ml_dtypes.bfloat16`` arrays over the same memory.

    Raises
    ------
    TypeError
        ``x`` cannot be read as an array (ragged lists, torch bfloat16 without ml_dtypes,
        a tensor on another device); the message names ``name``.

    Examples
    --------
    >>> from numba_attn.interop import to_numpy
    >>> to_numpy("kv_lens", [3, 4]).tolist()
    [3, 4]
    >>> to_numpy("mask", [[1, 0], [1]])
    Traceback (most recent call last):
        ...
    TypeError: mask: cannot be read as an array (a ragged nested list?): ...
    """
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        t = x.detach()
        if t.device.type != "cpu":
            raise TypeError(f"{name}: a torch tensor on {t.device}; host arguments must be "
                            f"CPU tensors or numpy arrays")
        t = t.resolve_conj().resolve_neg()
        torch = sys.modules["torch"]
        if t.dtype == torch.bfloat16:
            bf = _bfloat16()
            if bf is None:
                raise TypeError(f"{name}: torch.bfloat16 tensors need ml_dtypes "
                                f"(pip install ml_dtypes), or pass .float()")
            return t.view(torch.int16).numpy().view(bf)
        try:
            return t.numpy()
        except TypeError as e:
            raise TypeError(f"{name}: unsupported tensor dtype {t.dtype} ({e})") from None
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: cannot be read as an array (a ragged nested list?): "
                        f"{e}") from None


def like(ref, x):
    """Result ``x`` as the kind of array ``ref`` is, without a copy.

    A numpy ``x`` stays numpy unless ``ref`` is a torch tensor (then it becomes a CPU
    tensor sharing ``x``'s memory, bfloat16 included). Device results go to
    :func:`numba_attn.cuda.dispatch_cuda.like` (CuPy, torch CUDA).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn.interop import like
    >>> y = np.ones(2)
    >>> like(np.zeros(2), y) is y
    True
    """
    if isinstance(x, np.ndarray):
        if not is_torch(ref):
            return x
        torch = sys.modules["torch"]
        bf = _bfloat16()
        if bf is not None and x.dtype == bf:
            return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(
                torch.bfloat16)
        return torch.from_numpy(x)
    if type(ref).__module__.split(".")[0] not in ("cupy", "torch"):
        return x
    return device_op("like")(ref, x)


def lse_bhs(lse, bsz, sq, h):
    """lse of a batched call, (B * Sq, H) -> (B, H, Sq), on the array's own device."""
    if isinstance(lse, np.ndarray):
        return np.ascontiguousarray(lse.reshape(bsz, sq, h).transpose(0, 2, 1))
    return device_op("lse_bhs")(lse, bsz, sq, h)


def lse_ht(lse):
    """lse of a packed call, (Tq, H) -> (H, Tq), on the array's own device."""
    if isinstance(lse, np.ndarray):
        return np.ascontiguousarray(lse.T)
    return device_op("lse_transpose")(lse)


def like_device(ref, arrays, device):
    """Host results as the kind of array ``ref`` is: ``like`` for host inputs; copied to
    the GPU (and viewed as ``ref``'s kind) for device inputs."""
    if device == "cpu":
        return tuple(like(ref, a) for a in arrays)
    return device_op("to_device_like")(ref, arrays)


def merge_result(ref, out, lse, dtype, out_shape, lse_shape):
    """merge_states' results (compute dtype, on the backend's device) as ``ref``'s kind of
    array: out in ``dtype`` and ``out_shape``, lse in ``lse_shape``."""
    if isinstance(out, np.ndarray):
        return (like(ref, out.reshape(out_shape).astype(dtype, copy=False)),
                like(ref, lse.reshape(lse_shape)))
    return device_op("merge_result")(ref, out, lse, dtype, out_shape, lse_shape)


def device_op(name):
    """Function ``name`` of numba_attn.cuda.dispatch_cuda (device arrays in and out),
    looked up by module path: the CUDA side sits above this module and imports it.

    >>> from numba_attn.interop import device_op
    >>> device_op("like").__name__
    'like'
    """
    import importlib

    return getattr(importlib.import_module("numba_attn.cuda.dispatch_cuda"), name)


Array = Any
"""Type of the arrays numba_attn reads and returns: numpy arrays, torch tensors (CPU or
CUDA), CuPy and numba device arrays (anything with ``__cuda_array_interface__``)."""
