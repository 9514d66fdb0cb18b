"""Device arrays in, device arrays out; paged problems; merge_states; dispatch; errors."""
from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import numba_attn
from numba_attn import dispatch, functional, reference
from numba_attn.config import AttentionError, BackendUnavailable


def _qkv(rng, b, sq, sk, h, hkv, d, dtype=np.float32):
    return (rng.standard_normal((b, sq, h, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype))


def _is_device(x):
    return hasattr(x, "copy_to_host") and not isinstance(x, np.ndarray)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_device_in_device_out(rng, tuned, dtype):
    q, k, v = _qkv(rng, 2, 4, 6, 4, 2, 8, dtype)
    kv_lens = np.array([6, 3], np.int32)
    expected, expected_lse = reference.attention(q, k, v, causal=True, kv_lens=kv_lens,
                                                 return_lse=True)
    with tuned():
        got, lse = numba_attn.attention(*map(cuda.to_device, (q, k, v)), causal=True,
                                        kv_lens=kv_lens, return_lse=True)  # auto -> cuda
    assert _is_device(got) and _is_device(lse)
    assert got.shape == q.shape and got.dtype == dtype
    assert lse.shape == (2, 4, 4) and lse.dtype == np.float32
    tol = 3e-3 if dtype == np.float16 else 2e-5
    np.testing.assert_allclose(got.copy_to_host().astype(np.float64), expected, rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(lse.copy_to_host(), expected_lse, rtol=2e-5, atol=2e-5)


def test_device_non_contiguous_input(rng, tuned):
    q, k, v = _qkv(rng, 1, 3, 10, 2, 2, 8)
    dk = cuda.to_device(k)[:, ::2]  # every other key: a strided device view
    expected = reference.attention(q, k[:, ::2], v[:, ::2])
    with tuned():
        got = numba_attn.attention(cuda.to_device(q), dk, cuda.to_device(v[:, ::2].copy()))
    np.testing.assert_allclose(got.copy_to_host(), expected, rtol=2e-5, atol=2e-5)


def test_device_varlen_lse_layout(rng, tuned):
    cu = np.array([0, 2, 5], np.int32)
    q = rng.standard_normal((5, 2, 8)).astype(np.float32)
    k = rng.standard_normal((5, 1, 8)).astype(np.float32)
    expected, expected_lse = reference.attention_varlen(q, k, k, cu, cu, causal=True,
                                                        return_lse=True)
    with tuned():
        got, lse = numba_attn.attention_varlen(cuda.to_device(q), cuda.to_device(k),
                                               cuda.to_device(k), cu, cu, causal=True,
                                               return_lse=True)
    assert _is_device(lse) and lse.shape == (2, 5)
    np.testing.assert_allclose(got.copy_to_host(), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse.copy_to_host(), expected_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("lead", [(), (2,)], ids=["varlen-layout", "batched-layout"])
def test_merge_states_device(rng, lead):
    s, h, dv = 3, 2, 5
    oa, ob = (rng.standard_normal(lead + (s, h, dv)).astype(np.float32) for _ in range(2))
    la, lb = (rng.standard_normal(lead + (h, s)).astype(np.float32) for _ in range(2))
    la[..., 0, 0] = -np.inf  # one side empty: identity
    la[..., 1, 1] = lb[..., 1, 1] = -np.inf  # both empty: out 0, lse -inf
    expected, expected_lse = reference.merge_states(oa, la, ob, lb)
    got, lse = numba_attn.merge_states(*map(cuda.to_device, (oa, la, ob, lb)))
    assert _is_device(got) and got.shape == oa.shape and lse.shape == la.shape
    np.testing.assert_allclose(got.copy_to_host(), expected, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(lse.copy_to_host(), expected_lse, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_states_of_split_keys_equals_full(rng, tuned, dtype):
    if dtype == "bfloat16":  # outputs merged as their bits (merge_states_bf16)
        dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    q, k, v = _qkv(rng, 1, 3, 9, 2, 1, 8, dtype)
    dq = cuda.to_device(q)
    with tuned():
        oa, la = numba_attn.attention(dq, cuda.to_device(k[:, :4].copy()),
                                      cuda.to_device(v[:, :4].copy()), return_lse=True)
        ob, lb = numba_attn.attention(dq, cuda.to_device(k[:, 4:].copy()),
                                      cuda.to_device(v[:, 4:].copy()), return_lse=True)
    got, lse = numba_attn.merge_states(oa, la, ob, lb)
    assert got.dtype == np.dtype(dtype) and lse.dtype == np.float32
    f64 = lambda x: np.asarray(x).astype(np.float64)  # noqa: E731
    exp, exp_lse = reference.attention(f64(q), f64(k), f64(v), return_lse=True)
    tol = 2e-5 if dtype == "float32" else 1e-2  # bfloat16: the output's rounding
    np.testing.assert_allclose(f64(got.copy_to_host()), exp, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse.copy_to_host(), exp_lse, rtol=1e-5, atol=1e-5)


def _paged_problem(rng, block_size, device):
    """Two rows of a paged cache (blocks shuffled), bottom-right causal, GQA."""
    h, hkv, d = 4, 2, 8
    lens_q, lens_k = np.array([3, 1]), np.array([7, 11])
    nblk = -(-lens_k // block_size)
    perm = rng.permutation(int(nblk.sum()) + 2)  # two unused blocks
    table = np.zeros((2, nblk.max()), np.int32)
    table[0, :nblk[0]] = perm[:nblk[0]]
    table[1, :nblk[1]] = perm[nblk[0]:nblk[0] + nblk[1]]
    n = (int(nblk.sum()) + 2) * block_size
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    q = rng.standard_normal((int(lens_q.sum()), h, d)).astype(np.float32)
    rows = np.zeros((2, 5), np.int64)
    rows[:, 0] = [0, lens_q[0]]
    rows[:, 1] = lens_q
    rows[:, 3] = lens_k
    rows[:, 4] = lens_k - lens_q
    if device == "cuda":
        q, k, v, table = map(cuda.to_device, (q, k, v, table))
    return functional.build_problem(
        q=q, k=k, v=v, rows=rows, block_table=table, block_size=block_size,
        max_seqlen_q=int(lens_q.max()), max_seqlen_k=int(lens_k.max()), batch=2,
        causal=True, window=(-1, -1), scale=None, softcap=0.3, alibi_slopes=None,
        bias=None, mask=None, sinks=rng.standard_normal(h), has_kv_lens=False,
        out_dtype=np.float32, device=device)


@pytest.mark.parametrize("block_size", [1, 3, 4], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_paged_block_table(rng, tuned, device, block_size):
    p = _paged_problem(rng, block_size, device)
    expected, expected_lse = dispatch.run(p, "reference")
    with tuned():
        got, lse = dispatch.run(p, "cuda")
    if device == "cuda":
        got, lse = got.copy_to_host(), lse.copy_to_host()
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, expected_lse, rtol=2e-5, atol=2e-5)


def test_auto_runs_where_the_data_lives(rng):
    assert dispatch.select(_paged_problem(rng, 2, "cuda")).name == "cuda"
    assert dispatch.select(_paged_problem(rng, 2, "cpu")).name == "cpu"
    with pytest.raises(BackendUnavailable, match="cpu"):
        dispatch.select(_paged_problem(rng, 2, "cuda"), "cpu")


def test_launch_config_is_cached(rng, tuned):
    from numba_attn.cuda import forward as fk
    from numba_attn.cuda import launch

    q, k, v = _qkv(rng, 1, 1, 6, 2, 1, 8)
    with tuned():
        numba_attn.attention(q, k, v, backend="cuda")
        n_kernels, n_plans = len(fk._KERNELS), len(launch._PLANS)
        numba_attn.attention(q, k[:, :5], v[:, :5], backend="cuda")  # another cache length
    assert (len(fk._KERNELS), len(launch._PLANS)) == (n_kernels, n_plans)


# --- bad input: the same errors as on the CPU path -------------------------------------
def test_mixed_devices_name_the_argument(rng):
    q, k, v = _qkv(rng, 1, 2, 3, 2, 2, 8)
    with pytest.raises(AttentionError, match="k on cpu"):
        numba_attn.attention(cuda.to_device(q), k, cuda.to_device(v))
    oa = rng.standard_normal((2, 2, 4)).astype(np.float32)
    la = np.zeros((2, 2), np.float32)
    with pytest.raises(AttentionError, match="lse_b"):
        numba_attn.merge_states(cuda.to_device(oa), cuda.to_device(la), cuda.to_device(oa), la)


@pytest.mark.parametrize("bad, match", [
    (dict(kv_lens=np.array([9], np.int32)), "kv_lens"),
    (dict(window=(-2, 0)), "window"),
    (dict(bias=np.zeros((3, 5))), "bias"),
], ids=["kv_lens-range", "window", "bias-shape"])
def test_bad_input_same_error_as_cpu(rng, bad, match):
    q, k, v = _qkv(rng, 1, 2, 3, 2, 2, 8)
    with pytest.raises(AttentionError, match=match) as on_cpu:
        numba_attn.attention(q, k, v, **bad)
    with pytest.raises(AttentionError, match=match) as on_gpu:
        numba_attn.attention(*map(cuda.to_device, (q, k, v)), **bad)
    assert str(on_gpu.value) == str(on_cpu.value)


def test_head_dim_mismatch_on_device(rng):
    q, k, v = _qkv(rng, 1, 2, 3, 2, 2, 8)
    with pytest.raises(AttentionError, match="head_dim"):
        numba_attn.attention(cuda.to_device(q[..., :4].copy()), cuda.to_device(k),
                             cuda.to_device(v))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_device_out_argument(rng, tuned, layout):
    q, k, v = _qkv(rng, 1, 3, 5, 2, 1, 8)
    big = cuda.to_device(np.full((1, 3, 2, 16), np.nan, np.float32))
    out = cuda.to_device(np.full((1, 3, 2, 8), np.nan, np.float32)) if layout == "contiguous" \
        else big[:, :, :, 4:12]
    with tuned():
        got = numba_attn.attention(*map(cuda.to_device, (q, k, v)), causal=True, out=out)
    assert got is out
    np.testing.assert_allclose(out.copy_to_host(), reference.attention(q, k, v, causal=True),
                               rtol=2e-5, atol=2e-5)
    if layout == "strided":
        assert np.isnan(big.copy_to_host()[..., :4]).all()  # neighbours untouched


def test_out_on_the_other_device_is_an_error(rng):
    q, k, v = _qkv(rng, 1, 3, 5, 2, 1, 8)
    dq, dk, dv = map(cuda.to_device, (q, k, v))
    with pytest.raises(AttentionError, match="out"):
        numba_attn.attention(dq, dk, dv, out=np.zeros(q.shape, np.float32))
    with pytest.raises(AttentionError, match="out"):
        numba_attn.attention(q, k, v, out=cuda.to_device(np.zeros(q.shape, np.float32)))
    with pytest.raises(AttentionError, match="out: expected shape"):
        numba_attn.attention(dq, dk, dv, out=cuda.to_device(np.zeros((1, 3, 2, 4), np.float32)))


# --- optional inputs on the device: checked from shape/dtype, never copied to the host --
@pytest.fixture
def no_host_copy_of(monkeypatch):
    """``no_host_copy_of(*names)``: dispatch.host raises if asked for one of these inputs."""
    def install(*names):
        real = dispatch.host

        def guarded(name, x, dtype=None):
            assert name not in names, f"{name} was copied to the host"
            return real(name, x, dtype)

        monkeypatch.setattr(dispatch, "host", guarded)
    return install


def test_device_bias_and_mask_stay_on_the_device(rng, tuned, no_host_copy_of):
    q, k, v = _qkv(rng, 2, 3, 7, 4, 2, 8)
    dq, dk, dv = map(cuda.to_device, (q, k, v))
    bias = rng.integers(-3, 3, (4, 1, 7))  # int64, broadcast over batch and queries
    mask = rng.random((3, 7)) < 0.7  # bool (seqlen_q, seqlen_k), broadcast
    mask[:, 0] = True
    wide = rng.standard_normal((2, 4, 3, 14)).astype(np.float32)
    cases = {  # device bias -> the host bias it stands for
        "int64, cast on the device": (cuda.to_device(bias), bias),
        "float32, read in place": (cuda.to_device(bias.astype(np.float32)), bias),
        "strided, copied on the device": (cuda.to_device(wide)[..., ::2], wide[..., ::2]),
    }
    no_host_copy_of("bias", "mask")
    for what, (dbias, hbias) in cases.items():
        with tuned():
            got = numba_attn.attention(dq, dk, dv, bias=dbias, mask=cuda.to_device(mask),
                                       causal=True)
        np.testing.assert_allclose(got.copy_to_host(), reference.attention(
            q, k, v, bias=hbias, mask=mask, causal=True), rtol=2e-5, atol=2e-5, err_msg=what)


def test_device_bias_of_the_compute_dtype_is_not_copied(rng):
    from numba_attn import validate

    dbias = cuda.to_device(rng.standard_normal((2, 1, 5)).astype(np.float32))
    flat, strides = validate.strided_operand("bias", dbias, (3, 2, 4, 5), np.float32,
                                             device="cuda")
    from numba import config

    def ptr(a):
        if config.ENABLE_CUDASIM:
            return a._ary.__array_interface__["data"][0]
        return a.device_ctypes_pointer.value

    assert ptr(flat) == ptr(dbias) and flat.shape == (10,)
    assert strides.tolist() == [0, 5, 0, 1]


def test_device_bias_in_a_kvcache_decode_stays_on_the_device(rng, tuned, no_host_copy_of):
    from numba_attn import KVCache

    cache = KVCache(2, 6, 1, 8, device="cuda")
    kv = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    cache.append(cuda.to_device(kv), cuda.to_device(kv))
    q = rng.standard_normal((2, 1, 2, 8)).astype(np.float32)
    bias = rng.standard_normal((2, 1, 1, 4)).astype(np.float32)
    no_host_copy_of("bias")
    with tuned():
        got = numba_attn.attention_with_kvcache(cuda.to_device(q), cache,
                                                bias=cuda.to_device(bias))
    np.testing.assert_allclose(got.copy_to_host(), reference.attention(q, kv, kv, bias=bias),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name, value, exc", [
    ("bias", np.zeros((3, 5), np.float32), AttentionError),
    ("bias", np.zeros((2, 3), bool), TypeError),
    ("mask", np.ones((2, 3), np.float32), TypeError),
    ("mask", np.ones((1, 1, 1, 2, 3), bool), AttentionError),
], ids=["bias-shape", "bool-bias", "float-mask", "mask-5d"])
def test_device_bias_mask_errors_match_the_host(rng, name, value, exc):
    q, k, v = _qkv(rng, 1, 2, 3, 2, 2, 8)
    with pytest.raises(exc) as on_cpu:
        numba_attn.attention(q, k, v, **{name: value})
    with pytest.raises(exc) as on_gpu:
        numba_attn.attention(*map(cuda.to_device, (q, k, v)), **{name: cuda.to_device(value)})
    assert str(on_gpu.value) == str(on_cpu.value) and name in str(on_gpu.value)


def test_device_out_with_host_inputs_is_refused_before_anything_runs(rng):
    """validate.check_out: a device out= of host inputs (batched, packed, a host cache)."""
    from numba_attn import KVCache

    q = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    out = cuda.to_device(np.zeros_like(q))
    with pytest.raises(AttentionError, match="out: a device array while q, k, v are host"):
        numba_attn.attention(q, q, q, out=out)
    cu = np.array([0, 3], np.int32)
    with pytest.raises(AttentionError, match="out: a device array while q, k, v are host"):
        numba_attn.attention_varlen(q[0], q[0], q[0], cu, cu, out=cuda.to_device(q[0] * 0))
    cache = KVCache(1, 8, 2, 8)
    with pytest.raises(AttentionError, match="out: a device array while q, k, v are host"):
        numba_attn.attention_with_kvcache(q, cache, q, q, out=out)
    assert not out.copy_to_host().any() and int(cache.seqlens[0]) == 0
