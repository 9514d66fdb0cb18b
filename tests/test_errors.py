"""Bad input raises the documented exception naming the argument, before any kernel runs."""
from __future__ import annotations

import numpy as np
import pytest

import numba_attn as na
from numba_attn import AttentionError, BackendUnavailable


def qkv(b=2, sq=5, sk=7, h=4, hkv=2, d=8, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, sq, h, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype),
            rng.standard_normal((b, sk, hkv, d)).astype(dtype))


q, k, v = qkv()

CASES = {
    # name: (call kwargs overriding q/k/v/options, exception, text the message must contain)
    "q-rank": (dict(q=q[0]), AttentionError, "q"),
    "k-rank": (dict(k=k[0]), AttentionError, "k"),
    "v-not-array": (dict(v=[1, 2]), TypeError, "v"),
    "batch-mismatch": (dict(k=k[:1], v=v[:1]), AttentionError, "k.shape[0]"),
    "seqlen-kv-mismatch": (dict(v=v[:, :3]), AttentionError, "v.shape[1]"),
    "heads-kv-mismatch": (dict(v=qkv(hkv=4)[2]), AttentionError, "v.shape[2]"),
    "head-dim-mismatch": (dict(k=qkv(d=16)[1]), AttentionError, "k.shape[3]"),
    "gqa-indivisible": (dict(k=qkv(hkv=3)[1], v=qkv(hkv=3)[2]), AttentionError,
                        "num_heads % num_kv_heads"),
    "zero-heads": (dict(q=np.zeros((2, 5, 0, 8), np.float32)), AttentionError, "num_heads"),
    "zero-head-dim": (dict(q=np.zeros((2, 5, 4, 0), np.float32),
                           k=np.zeros((2, 7, 2, 0), np.float32)), AttentionError, "head_dim"),
    "int-dtype": (dict(q=q.astype(np.int32)), TypeError, "q"),
    "mixed-dtype": (dict(k=k.astype(np.float64)), TypeError, "k"),
    "nan-scale": (dict(scale=float("nan")), AttentionError, "scale"),
    "negative-scale": (dict(scale=-0.1), AttentionError, "scale"),
    "bad-window": (dict(window=(-3, 2)), AttentionError, "window"),
    "window-not-pair": (dict(window=5), AttentionError, "window"),
    "bad-causal": (dict(causal="left"), AttentionError, "causal"),
    "negative-softcap": (dict(softcap=-1.0), AttentionError, "softcap"),
    "bias-not-broadcastable": (dict(bias=np.zeros((5, 6))), AttentionError, "bias"),
    "bias-5d": (dict(bias=np.zeros((1, 2, 4, 5, 7))), AttentionError, "bias"),
    "mask-not-broadcastable": (dict(mask=np.ones((3, 1, 5, 7), bool)), AttentionError, "mask"),
    "mask-not-bool": (dict(mask=np.ones((5, 7), np.float32)), TypeError, "mask"),
    "kv-lens-too-long": (dict(kv_lens=np.array([3, 8])), AttentionError, "kv_lens"),
    "kv-lens-negative": (dict(kv_lens=np.array([-1, 2])), AttentionError, "kv_lens"),
    "kv-lens-shape": (dict(kv_lens=np.array([3])), AttentionError, "kv_lens"),
    "kv-lens-float": (dict(kv_lens=np.array([3.0, 2.0])), TypeError, "kv_lens"),
    "alibi-shape": (dict(alibi_slopes=np.ones(3)), AttentionError, "alibi_slopes"),
    "sinks-shape": (dict(sinks=np.ones(2)), AttentionError, "sinks"),
    "sinks-nonfinite": (dict(sinks=np.array([0, 0, np.inf, 0.0])), AttentionError, "sinks"),
    "out-shape": (dict(out=np.zeros((2, 5, 4, 7), np.float32)), AttentionError, "out"),
    "out-dtype": (dict(out=np.zeros((2, 5, 4, 8), np.float64)), TypeError, "out"),
    "unknown-backend": (dict(backend="tpu"), AttentionError, "backend"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_names_the_argument(name):
    kw, exc, text = CASES[name]
    args = dict(q=q, k=k, v=v)
    args.update({n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
    with pytest.raises(exc) as info:
        na.attention(args["q"], args["k"], args["v"], **kw)
    assert text in str(info.value)


def test_failed_call_leaves_out_and_inputs_untouched():
    out = np.full((2, 5, 4, 8), 7.0, np.float32)
    before = [x.copy() for x in (q, k, v)]
    with pytest.raises(AttentionError):
        na.attention(q, k, v, out=out, kv_lens=np.array([1, 99]))
    np.testing.assert_array_equal(out, 7.0)
    for x, y in zip((q, k, v), before):
        np.testing.assert_array_equal(x, y)


def test_read_only_out_rejected():
    out = np.zeros((2, 5, 4, 8), np.float32)
    out.setflags(write=False)
    with pytest.raises(AttentionError, match="out"):
        na.attention(q, k, v, out=out)


def test_cuda_backend_on_host_without_gpu_says_why():
    reasons = na.available_backends()
    assert reasons["cpu"] is None and reasons["reference"] is None
    if reasons.get("cuda"):
        with pytest.raises(BackendUnavailable, match="cuda"):
            na.attention(q, k, v, backend="cuda")


VARLEN = dict(q=np.zeros((6, 4, 8), np.float32), k=np.zeros((9, 2, 8), np.float32),
              v=np.zeros((9, 2, 8), np.float32))


@pytest.mark.parametrize("cu_q, cu_k, text", [
    ([0, 4, 2, 6], [0, 3, 6, 9], "cu_seqlens_q"),  # not monotone
    ([1, 3, 6], [0, 4, 9], "cu_seqlens_q"),  # does not start at 0
    ([0, 3, 6], [0, 4, 8], "cu_seqlens_k"),  # does not end at total
    ([0, 3, 6], [0, 9], "cu_seqlens_q and cu_seqlens_k"),  # lengths differ
    ([[0, 3, 6]], [0, 4, 9], "cu_seqlens_q"),  # not 1-D
], ids=["not-monotone", "not-from-0", "wrong-total", "length-mismatch", "2d"])
def test_bad_cu_seqlens(cu_q, cu_k, text):
    with pytest.raises(AttentionError) as info:
        na.attention_varlen(VARLEN["q"], VARLEN["k"], VARLEN["v"], np.array(cu_q, np.int32),
                            np.array(cu_k, np.int32))
    assert text in str(info.value)


def test_max_seqlen_too_small():
    with pytest.raises(AttentionError, match="max_seqlen_q"):
        na.attention_varlen(VARLEN["q"], VARLEN["k"], VARLEN["v"], np.array([0, 3, 6]),
                            np.array([0, 4, 9]), max_seqlen_q=2)


def test_merge_states_shape_errors():
    out = np.zeros((5, 3, 8))
    lse = np.zeros((3, 5))
    with pytest.raises(AttentionError, match="lse_b"):
        na.merge_states(out, lse, out, lse.T)
    with pytest.raises(AttentionError, match="out_b"):
        na.merge_states(out, lse, out[:4], lse)


def test_empty_batch_and_queries_are_fine():
    qz, kz, vz = qkv(b=0)
    assert na.attention(qz, kz, vz).shape == (0, 5, 4, 8)
    qz, kz, vz = qkv(sq=0)
    out, lse = na.attention(qz, kz, vz, return_lse=True)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0)


def test_mod_error_is_exported_and_raised_before_anything_runs():
    """ModError (a bad score_mod / mask_mod) is public: numba_attn.ModError, in __all__,
    catchable as AttentionError and TypeError."""
    from numba_attn.mods import ModError

    assert na.ModError is ModError and "ModError" in na.__all__
    assert issubclass(na.ModError, AttentionError) and issubclass(na.ModError, TypeError)

    def two_args(score, b):
        return score

    out = np.full_like(q, 7.0)
    with pytest.raises(na.ModError, match=r"score_mod: .*two_args.* cannot take 5 positional"):
        na.attention(q, k, v, score_mod=two_args, out=out)
    assert (out == 7.0).all()
