"""The CUDA backend: ``@cuda.jit`` kernels behind the same dispatch as the CPU ones.

Importing this package never fails on a machine without CUDA: it registers a
:class:`CUDABackend` whose ``unavailable_reason()`` says why it cannot serve (numba-cuda
missing, no driver or GPU). The kernel modules (``forward``, ``launch``, ``dispatch_cuda``)
import numba-cuda and are loaded only when the backend runs.
"""
from __future__ import annotations

import threading

import numpy as np

from .. import backends as _be
from ..validate import as_np_dtype
from ..interop import _is_bfloat16

__all__ = ["CUDABackend"]

# 8-bit KV-cache storage the forward kernel dequantizes in registers (cuda/quant.py)
_QUANT_NAMES = ("int8", "float8_e4m3fn", "float8_e5m2")

_probe_lock = threading.Lock()
_probe_result = []


def _probe():
    """None when a GPU (or the CUDA simulator) can run kernels, else the reason (cached)."""
    with _probe_lock:
        if not _probe_result:
            _probe_result.append(_find_reason())
        return _probe_result[0]


INSTALL_HINT = ("pip install 'numba_attn[cuda12]' or 'numba_attn[cuda13]' (the CUDA major "
                "version of your driver; '[cuda]' to use your own CUDA toolkit)")


def numba_cuda_installed():
    """Whether the numba-cuda distribution is installed (numba's own numba.cuda is not it)."""
    from importlib import metadata

    try:
        metadata.version("numba-cuda")
    except metadata.PackageNotFoundError:
        return False
    return True


def _find_reason():
    if not numba_cuda_installed():
        return f"numba-cuda is not installed; {INSTALL_HINT}"
    try:
        from numba import config, cuda
    except Exception as e:  # ImportError, or a broken install
        return f"numba-cuda cannot be imported ({type(e).__name__}: {e}); {INSTALL_HINT}"
    if getattr(config, "ENABLE_CUDASIM", 0):
        return None
    try:
        if cuda.is_available():
            return None
    except Exception as e:  # pragma: no cover - driver-specific failures
        return f"no CUDA driver/GPU found: {e}"
    detail = ""
    try:
        from numba.cuda.cudadrv.driver import driver

        err = getattr(driver, "initialization_error", None)
        detail = " ".join(str(err).split()) if err else "no CUDA device visible"
    except Exception as e:  # pragma: no cover
        detail = str(e)
    return f"no CUDA driver/GPU found: {detail}"


class CUDABackend(_be.Backend):
    """Flash-attention forward with ``@cuda.jit`` kernels (numba-cuda).

    Serves device problems (``auto`` picks it for device arrays only) and, when asked for
    by name, host problems: the arrays are copied to the GPU and the results back.
    """

    name = "cuda"
    device = "cuda"
    operations = frozenset({"forward", "backward", "merge", "rotary", "norm"})
    reads_quantized_kv = True

    def unavailable_reason(self):
        return _probe()

    def not_supported_reasons(self, problem, op="forward") -> list:
        if op in ("merge", "rotary", "norm"):  # elementwise, on the arrays' own device
            return ([] if problem.device == "cuda" else
                    [f"{op}: the cuda backend serves device arrays (host arrays: backend "
                     "'cpu')"])
        reasons = []
        if problem.device not in ("cpu", "cuda"):
            reasons.append(f"data lives on {problem.device!r}; the cuda backend reads host "
                           "or CUDA device arrays")
        for name in ("q", "k", "v"):
            dt = as_np_dtype(getattr(problem, name).dtype)
            if name != "q" and dt.name in _QUANT_NAMES:  # 8-bit KV-cache storage
                if "kv_scales" not in problem.extra:
                    reasons.append(f"{name}: dtype {dt} is read by the cuda kernels only as "
                                   "the storage of an 8-bit KV cache (KVCache / "
                                   "PagedKVCache / MLACache with their scales)")
                    break
                if op == "backward":
                    reasons.append(f"{name}: no backward over an 8-bit {dt} KV cache")
                    break
                continue
            if dt not in (np.float16, np.float32, np.float64) and not _is_bfloat16(dt):
                reasons.append(f"{name}: dtype {dt} is not supported by the cuda kernels "
                               "(float16, bfloat16, float32, float64)")
                break
        if op == "backward":  # per-thread kernels: no shared-memory tiles to fit
            if "mods" in problem.extra:
                reasons.append("no backward for score_mod / mask_mod / block_mask yet; use "
                               "backend='cpu' (host arrays)")
            return reasons
        cfg = problem.config
        from .launch import plan  # numba-cuda is importable once unavailable_reason is None

        if plan(problem.compute_dtype, cfg.head_dim, cfg.head_dim_v, cfg.group_size,
                problem.max_seqlen_q) is None:
            reasons.append(f"head_dim={cfg.head_dim}, head_dim_v={cfg.head_dim_v} with "
                           f"{cfg.group_size} query heads per kv head do not fit in shared "
                           "memory")
        return reasons

    def run(self, problem):
        if "dropout" in problem.extra:  # its own kernel: dropout_p = 0 runs the unchanged one
            from .launch import forward_dropout

            return forward_dropout(problem, *problem.extra["dropout"])
        from .launch import forward

        return forward(problem)

    def backward(self, problem, dout, out, lse, dropout_p, seed, bias_shape):
        from .launch import backward

        return backward(problem, dout, out, lse, dropout_p, seed, bias_shape)

    def merge(self, out_a, lse_a, out_b, lse_b):
        from .launch import merge_states

        return merge_states(out_a, lse_a, out_b, lse_b)

    def rotary(self, x, cos, sin, pos, interleaved, out):
        from .rope import rotate

        return rotate(x, cos, sin, pos, interleaved, out)

    def rms_norm(self, x, weight, eps, out):
        from .launch import rms_norm

        return rms_norm(x, weight, eps)


_be.register_backend(CUDABackend())
