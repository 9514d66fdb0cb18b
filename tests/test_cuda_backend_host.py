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


@pytest.mark.parametrize("module, names", [
    ("numba_attn.cuda", ("CUDABackend",)),
    ("numba_attn.cuda.forward", ("COPY_KERNELS", "merge_states")),
    ("numba_attn.cuda.launch", ("plan", "forward")),
    ("numba_attn.cuda.dispatch_cuda", ("pack", "run_into", "to_device_like"))])
def test_modules_import_without_a_gpu(module, names):
    """Importing the CUDA side on a machine without a GPU gives its working names (an
    import that half-failed, or a module emptied by a guard, would not)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    mod = importlib.import_module(module)
    missing = [n for n in names if not callable(getattr(mod, n, None))
               and not isinstance(getattr(mod, n, None), dict)]
    assert not missing, (module, missing)


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


@pytest.mark.parametrize("dtype, dynamic", [(np.float16, False), (np.float32, False),
                                            (np.float64, False), ("bfloat16", False),
                                            (np.float32, True), (np.float64, True)])
def test_forward_kernel_compiles_for_sm90(dtype, dynamic):
    """Real numba-cuda typing + NVVM lowering of the forward kernel (no GPU needed)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    why = _toolchain_missing()
    if why:
        pytest.skip(why[:300])
    import numba
    from numba import cuda, types

    from numba_attn.cuda import forward as fk
    from numba_attn.cuda.ptxas_report import kernel_args

    bf16 = dtype == "bfloat16"  # bfloat16 storage reaches the kernel as uint16 bits
    dtype = np.uint16 if bf16 else dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    kern = fk.make_forward(acc, 64, 64, 4, 4, 32, 4, bf16=bf16, dynamic=dynamic,
                           heads=2 if dynamic else None)  # dynamic: half a group per block
    sig = types.void(*(numba.typeof(x) for x in kernel_args(dtype, acc)))
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    assert "shfl.sync.bfly" in ptx  # the warp reductions are real shuffles
    if dtype != np.float64:
        assert ".f64" not in ptx  # no silent double-precision math in float32 kernels
    # dynamic tiles: one extern shared buffer, no static tile and no runtime helper call
    assert (".extern .shared" in ptx) == dynamic
    assert "numba_attempt_nocopy_reshape" not in ptx
    if bf16:  # widening is a shift and a register move, no conversion call
        assert "shl.b32" in ptx and "call" not in ptx.split("// .globl")[-1]


def test_bfloat16_helper_kernels_compile_for_sm90():
    """The bfloat16 variants of the split merge, rotary and RMSNorm kernels type and lower."""
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    why = _toolchain_missing()
    if why:
        pytest.skip(why[:300])
    from numba import cuda, types

    from numba_attn.cuda import forward as fk
    from numba_attn.cuda import rope

    f32, u16, i64 = types.float32, types.uint16, types.int64
    cuda.compile_ptx(fk.merge_splits_bf16.py_func,
                     types.void(f32[:, :, :, ::1], f32[:, :, ::1], u16[:, :, ::1],
                                f32[:, ::1]), cc=(9, 0))
    cuda.compile_ptx(fk.merge_states_bf16.py_func,
                     types.void(u16[:, :, :, ::1], f32[:, :, ::1], u16[:, :, :, ::1],
                                f32[:, :, ::1], u16[:, :, :, ::1], f32[:, :, ::1]), cc=(9, 0))
    cuda.compile_ptx(rope._rotary_bf16.py_func,
                     types.void(u16[:, :, ::1], f32[:, ::1], f32[:, ::1], i64[::1],
                                u16[:, :, ::1], types.boolean), cc=(9, 0))
    from numba_attn.cuda import bf16 as bfm
    from numba_attn.cuda import norm

    rms = norm._make(types.float32, bfm.loader(True, "float32"), bfm.storer(True))
    cuda.compile_ptx(rms.py_func, types.void(u16[:, ::1], f32[::1], f32, u16[:, ::1]),
                     cc=(9, 0))


@pytest.mark.parametrize("dtype, plan, dynamic", [
    ("float32", (64, 64, 1, 16, 64, 4), False),
    ("float64", (64, 64, 1, 16, 32, 4), False),
    ("bfloat16", (128, 128, 4, 4, 32, 4), False),
    ("float32", (576, 576, 16, 1, 8, 4), True),
])
def test_ptxas_reading_agrees_with_the_launch_layout(dtype, plan, dynamic):
    """ptxas (an independent assembler) sees exactly the shared memory launch.shared_bytes
    plans for a static kernel, none for a dynamic one, and no register spills."""
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    why = _toolchain_missing()
    if why:
        pytest.skip(why[:300])
    import shutil

    if not shutil.which("ptxas"):
        pytest.skip("ptxas not on PATH (CUDA toolkit / nvidia-cuda-nvcc)")
    from numba_attn.cuda import launch
    from numba_attn.cuda.ptxas_report import read_forward

    r = read_forward(dtype, *plan, dynamic=dynamic)
    item = 8 if dtype == "float64" else 4
    want = 0 if dynamic else launch.shared_bytes(item, *plan)
    assert r["static_shared"] == want, r["ptxas"]
    assert r["spill_stores"] == r["spill_loads"] == 0, r["ptxas"]
    assert 0 < r["registers"] <= 255


def _rel_bias(score, b, h, i, j, table):
    return score + table[h, min(max(j - i, -4), 4) + 4]


def _doc_mask(b, h, i, j, doc):
    return doc[b, i] == doc[b, j] and j <= i


@pytest.mark.parametrize("storage, dynamic, heads", [
    (np.float32, False, None), ("bfloat16", False, None), (np.float32, True, 2),
    ("bfloat16", True, 2)], ids=["float32", "bfloat16", "float32-dynamic-chunked",
                                 "bfloat16-dynamic-chunked"])
def test_forward_kernel_with_mods_compiles_for_sm90(storage, dynamic, heads):
    """User mods as device functions (star-args over tuples of arrays) and the block-mask
    tile skipping type and lower with the real numba-cuda compiler, alone and with
    bfloat16 storage, dynamic shared tiles and a group spread over blocks (one kernel
    specialisation key covers them all)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    why = _toolchain_missing()
    if why:
        pytest.skip(why[:300])
    import numba
    from numba import cuda, types

    from numba_attn.cuda import forward as fk
    from numba_attn.cuda.ptxas_report import kernel_args

    bf16 = storage == "bfloat16"
    acc = np.float32
    kern = fk.make_forward(acc, 64, 64, 4, 4, 32, 4, bf16=bf16, dynamic=dynamic, heads=heads,
                           smod=_rel_bias, mmod=_doc_mask, blocks=True, n_sargs=1, n_margs=1)
    assert kern is not fk.make_forward(acc, 64, 64, 4, 4, 32, 4, bf16=bf16, dynamic=dynamic,
                                       heads=heads)  # mods are part of the key
    args = kernel_args(np.uint16 if bf16 else storage, acc,
                       sargs=(np.zeros((4, 9), np.float64),),
                       margs=(np.zeros((2, 8), np.int64),), bflags_shape=(1, 1, 2, 2))
    sig = types.void(*(numba.typeof(x) for x in args))
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    assert "shfl.sync.bfly" in ptx
    assert (".extern .shared" in ptx) == dynamic


@pytest.mark.parametrize("name", ["int8", "float8_e4m3fn", "float8_e5m2"])
def test_quantized_kv_kernels_compile_for_sm90(name):
    """The forward kernel over 8-bit K/V storage (int8, float8 as uint8 bits) and the
    device append that quantizes type and lower with the real numba-cuda compiler, in
    float32 only (no silent double-precision math) and without a libdevice call in the
    dequantization."""
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed")
    why = _toolchain_missing()
    if why:
        pytest.skip(why[:300])
    import numba
    from numba import cuda, types

    from numba_attn.cuda import cache_ops
    from numba_attn.cuda import forward as fk
    from numba_attn.cuda import quant as cq
    from numba_attn.cuda.ptxas_report import kernel_args

    code = {"int8": cq.INT8, "float8_e4m3fn": cq.E4M3, "float8_e5m2": cq.E5M2}[name]
    raw = np.int8 if code == cq.INT8 else np.uint8
    kern = fk.make_forward(np.float32, 64, 64, 4, 4, 32, 4, quant=code)
    assert kern is not fk.make_forward(np.float32, 64, 64, 4, 4, 32, 4)  # part of the key
    sig = types.void(*(numba.typeof(x) for x in kernel_args(np.float32, np.float32,
                                                            kv_store=raw)))
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    body = ptx.split("// .globl")[-1]
    assert ".f64" not in ptx and "call" not in body
    assert ("ld.global.s8" if code == cq.INT8 else "ld.global.u8") in ptx  # 1-byte loads
    for bf16 in (False, True):
        app = cache_ops._quantizer(code, bf16)
        sig = types.void(types.Array(numba.from_dtype(np.dtype(raw)), 3, "C"),
                         types.float32[:, ::1], types.int64[::1],
                         types.Array(types.uint16 if bf16 else types.float32, 3, "C"))
        ptx, _ = cuda.compile_ptx(app.py_func, sig, cc=(9, 0))
        assert ".f64" not in ptx and "call" not in ptx.split("// .globl")[-1]
