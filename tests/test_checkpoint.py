"""numba_attn.checkpoint (the torch-free safetensors reader), bfloat16 weights in layers and
the bfloat16-weight GEMV.

Files are written with the ``safetensors`` package (and, for malformed or exotic files, by
hand from the format: 8-byte little-endian header length, JSON header, data); what the
reader returns is compared with ``safetensors.numpy.load_file`` and with the arrays
written.
"""
from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest

import numba_attn
from numba_attn import CheckpointError, MultiHeadAttention, open_checkpoint

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def bf16():
    return pytest.importorskip("ml_dtypes").bfloat16


def write_raw(path, header, data=b"", header_len=None):
    """A safetensors file by hand: header dict -> JSON, then the data bytes."""
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.fixture
def arrays(rng):
    return {"f32": rng.standard_normal((3, 5)).astype(np.float32),
            "f16": rng.standard_normal((7,)).astype(np.float16),
            "f64": rng.standard_normal((2, 2, 3)),
            "i64": rng.integers(-9, 9, (4,)),
            "u8": rng.integers(0, 255, (6,), dtype=np.uint8),
            "flag": np.array([True, False, True]),
            "scalar": np.array(2.5, np.float32),
            "empty": np.zeros((0, 4), np.float32)}


def test_matches_safetensors_numpy(tmp_path, arrays):
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(arrays, str(path), metadata={"format": "np"})
    expected = safetensors_numpy.load_file(str(path))
    ckpt = open_checkpoint(path)
    assert sorted(ckpt) == sorted(expected) and len(ckpt) == len(arrays)
    for name, want in expected.items():
        got = ckpt[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable  # a view of the read-only map
    assert ckpt.metadata == {"format": "np"}
    assert ckpt.info("f32").dtype == "F32" and ckpt.info("f32").shape == (3, 5)
    assert open_checkpoint(tmp_path)["f16"].dtype == np.float16  # a directory works too


def test_zero_copy_views(tmp_path, arrays):
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(arrays, str(path))
    ckpt = open_checkpoint(path)
    a, b = ckpt["f32"], ckpt["f32"]
    assert not a.flags.owndata and np.shares_memory(a, b)


def test_bfloat16_native_and_widened(tmp_path, rng):
    b16 = bf16()
    w = rng.standard_normal((4, 9)).astype(b16)
    path = tmp_path / "w.safetensors"
    safetensors_numpy.save_file({"w": w, "i": np.arange(3, dtype=np.int32)}, str(path))
    native = open_checkpoint(path)["w"]
    assert native.dtype == b16 and not native.flags.owndata
    np.testing.assert_array_equal(native.view(np.uint16), w.view(np.uint16))
    for dt in (np.float32, np.float64):
        ckpt = open_checkpoint(path, dtype=dt)
        got = ckpt["w"]
        assert got.dtype == dt
        np.testing.assert_array_equal(got, w.astype(np.float64))  # widening is exact
        assert ckpt["i"].dtype == np.int32  # integers are never converted
    got = open_checkpoint(path).tensor("w", dtype=np.float32)
    np.testing.assert_array_equal(got, w.astype(np.float32))


def test_bfloat16_to_float32_needs_no_ml_dtypes(tmp_path, monkeypatch):
    path = write_raw(tmp_path / "w.safetensors",
                     {"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}},
                     np.array([0x3F80, 0xC040, 0x0000], "<u2").tobytes())
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now fails
    np.testing.assert_array_equal(open_checkpoint(path, dtype=np.float32)["w"],
                                  [1.0, -3.0, 0.0])
    with pytest.raises(CheckpointError, match="ml_dtypes.*dtype=np.float32"):
        open_checkpoint(path)["w"]


def test_float8_tensors(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    e4m3 = np.array([1.0, -0.5, 448.0], np.float32).astype(ml_dtypes.float8_e4m3fn)
    e5m2 = np.array([2.0, -0.25], np.float32).astype(ml_dtypes.float8_e5m2)
    path = write_raw(tmp_path / "f8.safetensors",
                     {"a": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [0, 3]},
                      "b": {"dtype": "F8_E5M2", "shape": [2], "data_offsets": [3, 5]}},
                     e4m3.tobytes() + e5m2.tobytes())
    ckpt = open_checkpoint(path)
    assert ckpt["a"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(ckpt.tensor("a", dtype=np.float32), [1.0, -0.5, 448.0])
    np.testing.assert_array_equal(ckpt.tensor("b", dtype=np.float32), [2.0, -0.25])


def test_unaligned_tensor_is_read_correctly(tmp_path):
    vals = np.array([1.5, -2.25, 3.0], "<f4")
    path = write_raw(tmp_path / "u.safetensors",
                     {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                      "x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}},
                     b"\x07" + vals.tobytes())
    ckpt = open_checkpoint(path)
    assert ckpt["b"].tolist() == [7]
    got = ckpt["x"]
    np.testing.assert_array_equal(got, vals)
    assert got.flags.aligned


def test_sharded(tmp_path, rng):
    parts = {"a.safetensors": {"x": rng.standard_normal((2, 3)).astype(np.float32)},
             "b.safetensors": {"y": rng.standard_normal(4).astype(np.float32),
                               "unmapped": np.zeros(1, np.float32)}}
    for file, tensors in parts.items():
        safetensors_numpy.save_file(tensors, str(tmp_path / file))
    index = {"metadata": {"total_size": 40}, "weight_map": {"x": "a.safetensors",
                                                              "y": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt) == ["x", "y"]  # the index decides what the checkpoint holds
    np.testing.assert_array_equal(ckpt["x"], parts["a.safetensors"]["x"])
    np.testing.assert_array_equal(ckpt["y"], parts["b.safetensors"]["y"])
    assert ckpt.metadata["total_size"] == 40 and len(ckpt.files) == 2
    # the index names a tensor its shard lacks
    index["weight_map"]["z"] = "a.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"z \(expected in a.safetensors\)"):
        open_checkpoint(tmp_path)


def test_missing_shards_are_all_listed(tmp_path):
    index = {"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors",
                            "z": "s3.safetensors"}}
    safetensors_numpy.save_file({"y": np.ones(1, np.float32)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing shard") as err:
        open_checkpoint(tmp_path)
    assert "s1.safetensors" in str(err.value) and "s3.safetensors" in str(err.value)
    assert "s2.safetensors" not in str(err.value)


@pytest.mark.parametrize("case", ["short", "length", "json", "offsets", "size", "spec",
                                  "index"])
def test_malformed_files(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    ok = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "short":
        path.write_bytes(b"\x01\x02")
        match = "too short"
    elif case == "length":
        write_raw(path, ok, bytes(8), header_len=10**6)
        match = "header length"
    elif case == "json":
        path.write_bytes(struct.pack("<Q", 5) + b"{oops")
        match = "not valid JSON"
    elif case == "offsets":
        write_raw(path, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}},
                  bytes(8))
        match = "outside the 8 data bytes"
    elif case == "size":
        write_raw(path, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                  bytes(8))
        match = "8 bytes for shape \\(3,\\) of F32"
    elif case == "spec":
        write_raw(path, {"x": {"dtype": "F32", "shape": [2]}}, bytes(8))
        match = "data_offsets"
    else:
        path = tmp_path / "model.safetensors.index.json"
        path.write_text(json.dumps({"weights": {}}))
        match = "weight_map"
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(path)


def test_unknown_dtype_is_named_on_access(tmp_path):
    path = write_raw(tmp_path / "q.safetensors",
                     {"q": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 1]},
                      "x": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]}},
                     bytes(5))
    ckpt = open_checkpoint(path)
    assert ckpt.info("q").dtype == "Q4_K"
    assert ckpt["x"].shape == (1,)  # the rest stays readable
    with pytest.raises(CheckpointError, match="'Q4_K'.*supported: F64, F32, F16.*BF16"):
        ckpt["q"]


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        open_checkpoint(tmp_path)
    for name in ("a.safetensors", "b.safetensors"):
        safetensors_numpy.save_file({"x": np.ones(1, np.float32)}, str(tmp_path / name))
    with pytest.raises(CheckpointError, match="2 other .safetensors files"):
        open_checkpoint(tmp_path)
    with pytest.raises(KeyError, match="'y': no such tensor"):
        open_checkpoint(tmp_path / "a.safetensors")["y"]
    with pytest.raises(TypeError, match="dtype"):
        open_checkpoint(tmp_path / "a.safetensors", dtype=np.int32)


def test_check_lists_every_problem(tmp_path):
    safetensors_numpy.save_file({"a": np.ones((2, 3), np.float32),
                                 "b": np.ones(4, np.int64),
                                 "c": np.ones(5, np.float16)}, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    ckpt.check({"a": (2, 3), "c": (5,)})  # fine: returns quietly
    with pytest.raises(CheckpointError) as err:
        ckpt.check({"a": (3, 2), "b": (4,), "c": (5,), "d": (1,), "e": (2,)})
    msg = str(err.value)
    assert "missing: d, e" in msg
    assert "a: expected (3, 2), got (2, 3)" in msg
    assert "b: I64" in msg


# ---------------------------------------------------------------------------------------
# layers from a checkpoint
# ---------------------------------------------------------------------------------------
def attn_state(rng, prefix, hidden=32, heads=4, kv=2):
    d = hidden // heads
    return {f"{prefix}q_proj.weight": rng.standard_normal((heads * d, hidden)),
            f"{prefix}k_proj.weight": rng.standard_normal((kv * d, hidden)),
            f"{prefix}v_proj.weight": rng.standard_normal((kv * d, hidden)),
            f"{prefix}o_proj.weight": rng.standard_normal((hidden, heads * d))}


def test_layer_loads_from_a_checkpoint_prefix(tmp_path, rng):
    state = {k: v.astype(np.float32) for i in range(2)
             for k, v in attn_state(rng, f"model.layers.{i}.self_attn.").items()}
    safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    layer = MultiHeadAttention(32, 4, 2, rope_theta=1e4)
    layer.load_state_dict(ckpt, prefix="model.layers.1.self_attn.")
    np.testing.assert_array_equal(layer.w_k, state["model.layers.1.self_attn.k_proj.weight"])
    assert layer.w_k.flags.writeable  # the layer owns a copy, not the read-only map


def test_load_state_dict_reads_only_its_prefix(rng):
    state = {**attn_state(rng, "a."), **attn_state(rng, "b.")}

    class Counting(dict):
        read = []

        def __getitem__(self, key):
            Counting.read.append(key)
            return dict.__getitem__(self, key)

        def items(self):  # pragma: no cover - must not be used
            raise AssertionError("items() reads every value")

    layer = MultiHeadAttention(32, 4, 2, dtype=np.float64)
    layer.load_state_dict(Counting(state), prefix="b.")
    assert sorted(Counting.read) == sorted(k for k in state if k.startswith("b."))
    np.testing.assert_array_equal(layer.w_o, state["b.o_proj.weight"])


def test_load_state_dict_lists_wrong_dtypes(rng):
    state = attn_state(rng, "")
    state["k_proj.weight"] = state["k_proj.weight"].astype(np.int32)
    state["o_proj.weight"] = state["o_proj.weight"][:3]
    layer = MultiHeadAttention(32, 4, 2)
    before = layer.state_dict()
    with pytest.raises(numba_attn.AttentionError) as err:
        layer.load_state_dict(state)
    msg = str(err.value)
    assert "k_proj.weight: expected a floating dtype, got int32" in msg
    assert "o_proj.weight: expected (32, 32), got (3, 32)" in msg
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])  # nothing loaded


def test_bfloat16_weights_layer(tmp_path, rng):
    b16 = bf16()
    state = {k: v.astype(b16) for k, v in attn_state(rng, "").items()}
    safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    half = MultiHeadAttention(32, 4, 2, rope_theta=1e4, weight_dtype=b16)
    half.load_state_dict(ckpt)
    assert half.w_q.dtype == b16 and half.w_o.dtype == b16
    wide = MultiHeadAttention(32, 4, 2, rope_theta=1e4, dtype=np.float64)
    wide.load_state_dict(open_checkpoint(tmp_path, dtype=np.float64))
    for seq in (1, 9, 40):  # the GEMV path, and the widen-then-BLAS path
        x = rng.standard_normal((1, seq, 32)).astype(np.float32)
        np.testing.assert_allclose(half(x), wide(x.astype(np.float64)), rtol=1e-4,
                                   atol=1e-4)
    with pytest.raises(TypeError, match="weight_dtype"):
        MultiHeadAttention(32, 4, 2, dtype=np.float64, weight_dtype=b16)


# ---------------------------------------------------------------------------------------
# the GEMV (cpu/linear.py) on bfloat16 bits, and linear()
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_t, n_out, n_in", [(1, 1, 1), (1, 33, 17), (3, 70, 40),
                                              (5, 64, 129)])
def test_gemv_bfloat16_bits(rng, n_t, n_out, n_in):
    from numba_attn.cpu.linear import gemv

    b16 = bf16()
    w = rng.standard_normal((n_out, n_in)).astype(b16)
    x = rng.standard_normal((n_t, n_in)).astype(np.float32)
    out = np.full((n_t, n_out), np.nan, np.float32)
    gemv(x, w.view(np.uint16), out)
    expected = x.astype(np.float64) @ w.astype(np.float64).T
    naive_err = np.abs(x @ w.astype(np.float32).T - expected).max()
    assert np.abs(out - expected).max() <= 2 * naive_err + 1e-6


def test_linear_with_bfloat16_weights(rng):
    from numba_attn.layers import linear, widen

    b16 = bf16()
    w = rng.standard_normal((24, 40)).astype(b16)
    b = rng.standard_normal(24).astype(np.float32)
    np.testing.assert_array_equal(widen(w, np.float32), w.astype(np.float32))
    for n_t in (1, 16, 17, 50):
        x = rng.standard_normal((n_t, 40)).astype(np.float32)
        got = linear(x, w, b)
        assert got.dtype == np.float32
        expected = x.astype(np.float64) @ w.astype(np.float64).T + b
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
