"""AttentionConfig: constructors, predicates, and every invalid combination."""
import math

import pytest

from numba_attn import AttentionConfig, AttentionError


def test_defaults_fill_in():
    cfg = AttentionConfig(num_heads=8, head_dim=64)
    assert cfg.num_kv_heads == 8 and cfg.head_dim_v == 64
    assert cfg.scale == pytest.approx(1 / 8)
    assert cfg.causal == "none" and cfg.window == (-1, -1) and cfg.softcap == 0.0


@pytest.mark.parametrize("ctor, args, kind", [
    (AttentionConfig.mha, (8, 64), "mha"),
    (AttentionConfig.gqa, (32, 8, 128), "gqa"),
    (AttentionConfig.mqa, (16, 64), "mqa"),
], ids=["mha", "gqa", "mqa"])
def test_constructors_and_predicates(ctor, args, kind):
    cfg = ctor(*args)
    assert (cfg.is_mha, cfg.is_gqa, cfg.is_mqa) == (kind == "mha", kind == "gqa", kind == "mqa")
    assert cfg.group_size == cfg.num_heads // cfg.num_kv_heads


@pytest.mark.parametrize("causal, want", [(False, "none"), (True, "bottom_right"),
                                          ("bottom_right", "bottom_right"),
                                          ("top_left", "top_left")])
def test_causal_normalised(causal, want):
    assert AttentionConfig(num_heads=2, head_dim=8, causal=causal).causal == want


def test_frozen():
    cfg = AttentionConfig(num_heads=2, head_dim=8)
    with pytest.raises(Exception):
        cfg.num_heads = 4


@pytest.mark.parametrize("kwargs, names", [
    (dict(num_heads=0, head_dim=8), "num_heads"),
    (dict(num_heads=4, head_dim=0), "head_dim"),
    (dict(num_heads=4, num_kv_heads=0, head_dim=8), "num_kv_heads"),
    (dict(num_heads=4, head_dim=8, head_dim_v=0), "head_dim_v"),
    (dict(num_heads=6, num_kv_heads=4, head_dim=8), "num_heads % num_kv_heads"),
    (dict(num_heads=4, num_kv_heads=8, head_dim=8), "num_kv_heads"),
    (dict(num_heads=4, head_dim=8, window=(-2, 0)), "window"),
    (dict(num_heads=4, head_dim=8, window=(3,)), "window"),
    (dict(num_heads=4, head_dim=8, scale=math.nan), "scale"),
    (dict(num_heads=4, head_dim=8, scale=math.inf), "scale"),
    (dict(num_heads=4, head_dim=8, scale=0.0), "scale"),
    (dict(num_heads=4, head_dim=8, scale=-1.0), "scale"),
    (dict(num_heads=4, head_dim=8, softcap=-1.0), "softcap"),
    (dict(num_heads=4, head_dim=8, softcap=math.nan), "softcap"),
    (dict(num_heads=4, head_dim=8, causal="diagonal"), "causal"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_invalid_raises_naming_the_value(kwargs, names):
    with pytest.raises(AttentionError) as exc:
        AttentionConfig(**kwargs)
    assert names in str(exc.value)


def test_gqa_error_suggests_divisors():
    with pytest.raises(AttentionError, match=r"\[1, 2, 3, 6\]"):
        AttentionConfig(num_heads=6, num_kv_heads=4, head_dim=8)
