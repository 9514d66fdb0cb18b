"""The SIMD layer (numba_attn/cpu/simd.py) and the micro-kernels, against numpy.

Every intrinsic on every storage dtype, every tail length, the micro-kernel shape
classes, and a guard-page test that the masked tails never touch memory past an array.
The forced-ISA tests (AVX2 and generic lowering) are in test_cpu_paths.py.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import ml_dtypes
import numba
import numpy as np
import pytest

from numba_attn.cpu import simd as S
from numba_attn.cpu.microkernels import pv6, pv8, qk4, qk6, qk8, qk12

F32, F64 = np.float32, np.float64


@numba.njit
def _copy(src, dst, n):
    """dst[:n] = src[:n] through full vectors and one masked tail (the kernels' pattern)."""
    w = S.lanes(src)
    i = 0
    while i + w <= n:
        S.vstore(dst, i, S.vload(src, i))
        i += w
    if i < n:
        S.vstore_tail(dst, i, S.vload_tail(src, i, n - i), n - i)


@numba.njit
def _tail(src, dst, n):
    """One masked load of n lanes stored whole (the untouched lanes must read 0)."""
    S.vstore(dst, 0, S.vload_tail(src, 0, n))


@numba.njit
def _unary(x, out, op):
    w = S.lanes(x)
    for i in range(0, x.shape[0], w):
        v = S.vload(x, i)
        r = S.vexp(v) if op == 0 else S.vtanh(v)
        S.vstore(out, i, r)


@numba.njit
def _binary(a, b, c, out):
    w = S.lanes(a)
    for i in range(0, a.shape[0], w):
        x, y, z = S.vload(a, i), S.vload(b, i), S.vload(c, i)
        S.vstore(out, i, S.vadd(S.vmul(S.vmax(x, y), S.vsub(z, x)), S.vfma(x, y, z)))


@numba.njit
def _reduce(a):
    v = S.vload(a, 0)
    return S.vhsum(v), S.vhmax(v), S.load_scalar(a, 1)


@numba.njit
def _bcast_splat(a, i, out):
    S.vstore(out, 0, S.vadd(S.vbcast(a, i), S.vsplat(out[0])))


@numba.njit
def _sums16(vecs_src, out, stride):
    w = S.lanes(vecs_src)
    S.vsums_store(out, 0, stride, (
        S.vload(vecs_src, 0 * w), S.vload(vecs_src, 1 * w), S.vload(vecs_src, 2 * w),
        S.vload(vecs_src, 3 * w), S.vload(vecs_src, 4 * w), S.vload(vecs_src, 5 * w),
        S.vload(vecs_src, 6 * w), S.vload(vecs_src, 7 * w), S.vload(vecs_src, 8 * w),
        S.vload(vecs_src, 9 * w), S.vload(vecs_src, 10 * w), S.vload(vecs_src, 11 * w),
        S.vload(vecs_src, 12 * w), S.vload(vecs_src, 13 * w), S.vload(vecs_src, 14 * w),
        S.vload(vecs_src, 15 * w)))


@numba.njit
def _sums4(vecs_src, out, stride):
    w = S.lanes(vecs_src)
    S.vsums_store(out, 0, stride, (S.vload(vecs_src, 0), S.vload(vecs_src, w),
                                   S.vload(vecs_src, 2 * w), S.vload(vecs_src, 3 * w)))


def _storage(kind, n, rng):
    """(array the kernels read, its float64 values) for a storage kind."""
    x = rng.standard_normal(n) * 3
    if kind == "float16":
        h = x.astype(np.float16)
        return h.view(np.uint16), h.astype(F64)
    if kind == "bfloat16":
        b = x.astype(ml_dtypes.bfloat16)
        return b.view(np.int16), b.astype(F64)
    a = x.astype(kind)
    return a, a.astype(F64)


KINDS = ["float32", "float64", "float16", "bfloat16"]


def _lanes(kind):
    return S.LANES64 if kind == "float64" else S.LANES32


def _out_dtype(kind):
    return F64 if kind == "float64" else F32


def test_every_half_bit_pattern(rng):
    """All 65536 float16 bit patterns (subnormals, infinities, NaN) convert exactly."""
    bits = np.arange(2**16, dtype=np.uint16)
    out = np.empty(bits.size, F32)
    _copy(bits, out, np.int64(bits.size))
    want = bits.view(np.float16).astype(F32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan], want[~nan])


def test_isa_matches_lanes():
    assert S.ISA in ("avx512", "avx2", "generic")
    assert S.LANES32 * 4 == S.VECTOR_BYTES == S.LANES64 * 8


def test_kernel_storage_views():
    h = np.arange(4, dtype=np.float16)
    b = np.arange(4).astype(ml_dtypes.bfloat16)
    f = np.arange(4, dtype=F32)
    assert S.kernel_storage(h).dtype == np.uint16 and S.kernel_storage(h).base is h
    assert S.kernel_storage(b).dtype == np.int16
    assert S.kernel_storage(f) is f


@pytest.mark.parametrize("kind", KINDS)
def test_load_store_every_length(kind, rng):
    """Full vectors and masked tails of every length, converted exactly from storage."""
    w = _lanes(kind)
    for n in range(0, 3 * w + 1):
        src, want = _storage(kind, max(n, 1), rng)
        dst = np.full(n + w, 7.0, _out_dtype(kind))  # sentinel past n
        _copy(src, dst, np.int64(n))
        np.testing.assert_array_equal(dst[:n], want[:n].astype(dst.dtype))
        assert np.all(dst[n:] == 7.0), f"wrote past {n}"


@pytest.mark.parametrize("kind", KINDS)
def test_tail_lanes_read_zero(kind, rng):
    w = _lanes(kind)
    for n in range(0, w + 1):
        src, want = _storage(kind, max(n, 1), rng)
        dst = np.full(w, 7.0, _out_dtype(kind))
        _tail(src, dst, np.int64(n))
        np.testing.assert_array_equal(dst[:n], want[:n].astype(dst.dtype))
        assert np.all(dst[n:] == 0.0)


@pytest.mark.parametrize("dt", [F32, F64])
def test_exp_and_tanh(dt, rng):
    w = S.LANES64 if dt == F64 else S.LANES32
    n = 40 * w
    x = -np.abs(rng.standard_normal(n) * 40).astype(dt)
    x[:w] = [-np.inf, 0.0, -1e-30, -87.0, -88.5, -700.0, -745.0, -1.0][:1] * w
    x[w:2 * w] = np.linspace(-0.35, 0.0, w)
    got = np.empty_like(x)
    _unary(x, got, 0)
    expected = np.exp(x.astype(F64))
    assert np.all(got[:w] == 0.0)  # exp(-inf) is exactly 0
    tol = 3e-7 if dt == F32 else 5e-16
    big = expected > (1e-30 if dt == F32 else 1e-300)
    np.testing.assert_allclose(got[big], expected[big], rtol=tol)
    assert np.all(got[~big] <= 2e-30)
    y = (rng.standard_normal(n) * np.geomspace(1e-7, 30, n)).astype(dt)
    _unary(y, got, 1)
    np.testing.assert_allclose(got, np.tanh(y.astype(F64)), rtol=4 * tol, atol=0)


@pytest.mark.parametrize("dt", [F32, F64])
def test_arithmetic_and_reductions(dt, rng):
    w = S.LANES64 if dt == F64 else S.LANES32
    a, b, c = (rng.standard_normal(4 * w).astype(dt) for _ in range(3))
    got = np.empty_like(a)
    _binary(a, b, c, got)
    a64, b64, c64 = (x.astype(F64) for x in (a, b, c))
    expected = np.maximum(a64, b64) * (c64 - a64) + (a64 * b64 + c64)
    np.testing.assert_allclose(got, expected, rtol=1e-5 if dt == F32 else 1e-13, atol=1e-6)
    hs, hm, one = _reduce(a)
    assert hm == a[:w].max() and one == a[1]
    np.testing.assert_allclose(hs, a64[:w].sum(), rtol=1e-5 if dt == F32 else 1e-13)
    out = np.array([0.5] + [0.0] * (w - 1), dt)
    _bcast_splat(a, np.int64(3), out)
    np.testing.assert_allclose(out, np.full(w, a[3] + 0.5, dt), rtol=1e-6)


@pytest.mark.parametrize("dt", [F32, F64])
@pytest.mark.parametrize("nvec", [4, 16])
def test_transposed_lane_sums(dt, nvec, rng):
    """vsums_store: vector u * R + r -> out[u * stride + r] (R = nvec / 4 rows)."""
    w = S.LANES64 if dt == F64 else S.LANES32
    src = rng.standard_normal(nvec * w).astype(dt)
    stride = 7
    out = np.full(4 * stride, 9.0, dt)
    (_sums16 if nvec == 16 else _sums4)(src, out, np.int64(stride))
    sums = src.astype(F64).reshape(nvec, w).sum(1)
    rows = nvec // 4
    expected = np.full(4 * stride, 9.0)
    for t in range(nvec):
        u, r = divmod(t, rows)
        expected[u * stride + r] = sums[t]
    np.testing.assert_allclose(out, expected, rtol=2e-6 if dt == F32 else 1e-13, atol=1e-6)


@numba.njit
def _qk(kind, kt, kb, qt, ldq, s0, d, st, nk):
    for u in range(0, nk, kind):
        if kind == 8:
            qk8(kt, kb, u, qt, ldq, s0, d, st)
        elif kind == 12:
            qk12(kt, kb, u, qt, ldq, s0, d, st)
        elif kind == 4:
            qk4(kt, kb, u, qt, ldq, s0, d, st)
        else:
            qk6(kt, kb, u, qt, ldq, s0, d, st)


@numba.njit
def _pv(kind, vt, vb, nk, st, ot, ldo, s0, dv, a0, a1):
    for c0 in range(0, dv, kind):
        if kind == 8:
            pv8(vt, vb, nk, st, ot, ldo, s0, c0, dv, S.vbcast(a0, 0), S.vbcast(a1, 0))
        else:
            pv6(vt, vb, nk, st, ot, ldo, s0, c0, dv, S.vbcast(a0, 0), S.vbcast(a1, 0))


@pytest.mark.parametrize("mr", [8, 6, 12, 4])
@pytest.mark.parametrize("dt", [F32, F64])
@pytest.mark.parametrize("d,nk", [(64, 24), (3, 48), (1, 8), (17, 6)], ids=lambda x: str(x))
def test_micro_kernels(mr, dt, d, nk, rng):
    """qk / pv micro-kernels against numpy: full strips and one-channel / one-key-block
    shapes (the kernels' row and channel tails are covered by padding, tested through
    the forward in test_cpu_paths.py)."""
    nk = (nk + mr - 1) // mr * mr
    w = S.LANES64 if dt == F64 else S.LANES32
    nrs = 2 * w
    ldq = 3 * nrs  # three strips; use the middle one
    s0 = nrs
    k = rng.standard_normal((nk, d)).astype(dt)
    qt = rng.standard_normal((d, ldq)).astype(dt)
    kb = np.arange(0, nk * d, d)
    st = np.zeros(nk * nrs, dt)
    _qk(mr, k.reshape(-1), kb, qt.reshape(-1), ldq, s0, d, st, nk)
    expected = k.astype(F64) @ qt[:, s0:s0 + nrs].astype(F64)
    rtol = 1e-5 if dt == F32 else 1e-12
    np.testing.assert_allclose(st.reshape(nk, nrs), expected, rtol=rtol, atol=rtol * 10)
    if mr not in (8, 6):  # 12 and 4 are QK-only shapes
        return
    # pv: ot^T (dv, rows) = alpha * ot + V^T P
    dv = (d + mr - 1) // mr * mr
    v = rng.standard_normal((nk, dv)).astype(dt)
    p = rng.random((nk, nrs)).astype(dt)
    ot = rng.standard_normal((dv, ldq)).astype(dt)
    alpha = np.array([0.5], dt)
    want = ot.astype(F64).copy()
    want[:, s0:s0 + nrs] = 0.5 * want[:, s0:s0 + nrs] + v.astype(F64).T @ p.astype(F64)
    _pv(mr, v.reshape(-1), np.arange(0, nk * dv, dv), nk, p.reshape(-1), ot.reshape(-1),
        ldq, s0, dv, alpha, alpha)
    np.testing.assert_allclose(ot, want, rtol=rtol, atol=rtol * 10)


GUARD_SCRIPT = textwrap.dedent("""
    import ctypes, mmap, sys
    import numpy as np
    import numba
    from numba_attn.cpu import simd as S

    @numba.njit
    def touch(src, dst, n):
        S.vstore_tail(dst, 0, S.vload_tail(src, 0, n), n)
        return S.load_scalar(src, n - 1)

    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for dt in (np.float32, np.float64, np.uint16, np.int16):
        buf = mmap.mmap(-1, 2 * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert libc.mprotect(base + page, page, 0) == 0  # PROT_NONE guard page
        item = np.dtype(dt).itemsize
        lanes = S.LANES64 if dt == np.float64 else S.LANES32
        for n in range(1, lanes):
            # the last n elements before the guard page
            arr = np.frombuffer(buf, dtype=dt, count=n, offset=page - n * item)
            dst = np.zeros(n, np.float64 if dt == np.float64 else np.float32)
            touch(arr, dst, np.int64(n))
        del arr
    print("ok")
""")


def test_masked_tails_stay_inside_arrays():
    """Masked loads of the last n < lanes elements before a PROT_NONE page must not fault
    (a fault kills the child process, not pytest)."""
    r = subprocess.run([sys.executable, "-c", GUARD_SCRIPT], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
