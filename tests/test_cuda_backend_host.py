"""The CUDA backend seen from a machine without a GPU (the normal test process).

The kernels themselves are tested in tests/cuda_sim (simulator or real GPU). Here: the
backend registers and explains why it cannot serve, the modules import without CUDA, auto
dispatch keeps host arrays on the CPU, and — where NVVM is installed — every kernel
compiles for a real GPU (sm_90), so typing errors the simulator cannot see are caught.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import numba_attn
from numba_attn import dispatch
from numba_attn.config import BackendUnavailable


def _cuda_reason():
    return numba_attn.available_backends()["cuda"]


def test_cuda_backend_is_registered_and_says_why():
    backends = numba_attn.available_backends()
    assert "cuda" in backends
    be = dispatch.get_backend("cuda")
    assert (be.name, be.device) == ("cuda", "cuda")
    why = backends["cuda"]
    if why is not None:
        assert "numba-cuda" in why or "no CUDA driver/GPU found" in why


@pytest.mark.parametrize("module", ["numba_attn.cuda", "numba_attn.cuda.forward",
                                    "numba_attn.cuda.launch", "numba_attn.cuda.dispatch_cuda"])
def test_modules_import_without_a_gpu(module):
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    assert importlib.import_module(module) is not None


def test_explicit_cuda_backend_raises_with_the_reason():
    why = _cuda_reason()
    if why is None:
        pytest.skip("a GPU (or the simulator) is present: the cuda backend can serve")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 2, 8)).astype(np.float32)
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot serve") as err:
        numba_attn.attention(q, q, q, backend="cuda")
    assert why in str(err.value)


def test_auto_keeps_host_arrays_on_the_cpu():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    got = numba_attn.attention(q, q, q, causal=True)  # auto: must not need a GPU
    expected = numba_attn.attention(q, q, q, causal=True, backend="reference")
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def _toolchain_missing():
    """None when NVVM (+ NVRTC) can compile a tiny float16 kernel here, else why not."""
    try:
        import math

        from numba import cuda, types

        def probe(x, y):
            y[0] = x[0]  # float16 load + conversion, as in the forward kernel
            y[1] = math.exp(y[1])

        sig = types.void(types.float16[::1], types.float32[::1])
        cuda.compile_ptx(probe, sig, cc=(9, 0))
        return None
    except Exception as e:  # no libnvvm / libnvrtc: a missing toolchain, not a bug
        return f"CUDA compiler libraries not usable ({type(e).__name__}: {e}); " \
               "pip install nvidia-cuda-nvcc nvidia-cuda-nvrtc"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_forward_kernel_compiles_for_sm90(dtype):
    """Real numba-cuda typing + NVVM lowering of the forward kernel (no GPU needed)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    why = _toolchain_missing()
    if why:
        pytest.skip(why[:300])
    import numba
    from numba import cuda, types

    from numba_attn.cuda import forward as fk

    acc = np.float64 if dtype == np.float64 else np.float32
    kern = fk.make_forward(acc, 64, 64, 4, 4, 32, 4)

    def a(shape, dt):
        return np.zeros(shape, dt)

    args = (a((2, 2, 2), dtype), a((2, 2, 2), dtype), a((2, 2, 2), dtype), a((2, 2, 2), dtype),
            a((2, 2), acc), a((2, 2, 2, 2), acc), a((2, 2, 2), acc), a(16, np.int64),
            np.int64(10), a((2, 1), np.int32), np.int64(1), np.dtype(acc).type(1),
            np.int64(0), np.int64(0), np.int64(0), np.dtype(acc).type(0), a((1, 1), acc),
            True, a(1, acc), a(1, np.int64), True, a(1, np.bool_), a(1, np.int64), True,
            a(1, acc), True, (), (), a((1, 1, 1, 1), np.int8), np.int64(1), np.int64(1))
    sig = types.void(*(numba.typeof(x) for x in args))
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    assert "shfl.sync.bfly" in ptx  # the warp reductions are real shuffles
    if dtype != np.float64:
        assert ".f64" not in ptx  # no silent double-precision math in float32 kernels


def _rel_bias(score, b, h, i, j, table):
    return score + table[h, min(max(j - i, -4), 4) + 4]


def _doc_mask(b, h, i, j, doc):
    return doc[b, i] == doc[b, j] and j <= i


def test_forward_kernel_with_mods_compiles_for_sm90():
    """User mods as device functions (star-args over tuples of arrays) and the block-mask
    tile skipping type and lower with the real numba-cuda compiler."""
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    why = _toolchain_missing()
    if why:
        pytest.skip(why[:300])
    import numba
    from numba import cuda, types

    from numba_attn.cuda import forward as fk

    acc = np.float32
    kern = fk.make_forward(acc, 64, 64, 4, 4, 32, 4, _rel_bias, _doc_mask, True, 1, 1)

    def a(shape, dt):
        return np.zeros(shape, dt)

    args = (a((2, 2, 2), acc), a((2, 2, 2), acc), a((2, 2, 2), acc), a((2, 2, 2), acc),
            a((2, 2), acc), a((2, 2, 2, 2), acc), a((2, 2, 2), acc), a(16, np.int64),
            np.int64(10), a((2, 1), np.int32), np.int64(1), acc(1), np.int64(0),
            np.int64(0), np.int64(0), acc(0), a((1, 1), acc), True, a(1, acc),
            a(1, np.int64), True, a(1, np.bool_), a(1, np.int64), True, a(1, acc), True,
            (a((4, 9), np.float64),), (a((2, 8), np.int64),), a((1, 1, 2, 2), np.int8),
            np.int64(4), np.int64(4))
    sig = types.void(*(numba.typeof(x) for x in args))
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    assert "shfl.sync.bfly" in ptx
