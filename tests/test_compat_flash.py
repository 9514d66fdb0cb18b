"""numba_attn.compat checked the way FlashAttention's own tests/test_flash_attn.py checks
flash_attn: torch tensors as its callers build them (window_size as an int tensor,
cu_seqlens / cache_seqlens / block tables as int32 tensors), forward and backward through
torch autograd, float16 and bfloat16, dropout read back from S_dmask.

The tolerance is FlashAttention's rule, written here from its description: the error of
numba_attn against a float64 reference is at most a small multiple (2 for outputs and
probabilities, 3 for gradients) of the error of a plain torch implementation computed
in the inputs' own precision (with the scale moved onto k, so its rounding differs).
The grid is a fixed sample of FlashAttention's parameter grid (bounded CI time).
"""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from numba_attn import AttentionError, compat

torch = pytest.importorskip("torch")

DTYPES = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------
# the reference: one torch function, run in float64 (truth) or in the inputs' dtype
# ---------------------------------------------------------------------------------------
def attention_ref(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
                  key_lens=None, drop=None, p=0.0, dtype=torch.float64, low=False):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> (out (B, Sq, H, D), probs (B, H, Sq, Sk)),
    computed in ``dtype``; FlashAttention's bottom-right alignment for causal, window and
    ALiBi. ``low``: scale k instead of q (another rounding order). ``drop``: keep mask
    (B, H, Sq, Sk); ``key_lens`` (B,): keys past it are padding."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    k = k.repeat_interleave(h // hk, dim=2)
    v = v.repeat_interleave(h // hk, dim=2)
    scale = d ** -0.5
    s = (torch.einsum("bihd,bjhd->bhij", q, k * scale) if low else
         torch.einsum("bihd,bjhd->bhij", q * scale, k))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    if alibi is not None:
        s = s - alibi.to(dtype)[:, :, None, None] * (i - j).abs().to(dtype)
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        vis = vis & (j <= i)
    if window[0] >= 0:
        vis = vis & (j >= i - window[0])
    if window[1] >= 0:
        vis = vis & (j <= i + window[1])
    vis = vis.expand(b, h, sq, sk)
    if key_lens is not None:
        vis = vis & (j[None, None] < key_lens[:, None, None, None])
    s = s.masked_fill(~vis, float("-inf"))
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no visible key gives 0
    ad = a if drop is None else a.masked_fill(~drop, 0.0) / (1 - p)
    return torch.einsum("bhij,bjhd->bihd", ad, v), a


def err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def check_bound(name, got, low, truth, factor):
    """FlashAttention's rule: got's error at most ``factor`` x the low-precision
    reference's (plus a floor of a few float32 ulps for exactly representable cases)."""
    e_got, e_low = err(got, truth), err(low, truth)
    assert e_got <= factor * e_low + 1e-6, f"{name}: error {e_got:.3g} > {factor} x {e_low:.3g}"


def fixed_sample(grid, n, seed):
    """A fixed sample of ``n`` points of the product of ``grid`` (a dict of lists)."""
    points = list(itertools.product(*grid.values()))
    rng = random.Random(seed)
    return [dict(zip(grid, pt)) for pt in rng.sample(points, n)]


def param_id(c):
    return "-".join(f"{k}={v}".replace("torch.", "") for k, v in c.items())


# ---------------------------------------------------------------------------------------
# flash_attn_func / flash_attn_kvpacked_func / flash_attn_qkvpacked_func
# ---------------------------------------------------------------------------------------
GRID = dict(  # FlashAttention's test_flash_attn_output grid, shorter sequences
    seqlens=[(113, 203), (128, 217), (108, 256), (97, 97), (203, 113), (1, 130)],
    d=[32, 40, 59, 64, 80, 111, 128],
    causal=[False, True], local=[False, True], alibi=[False, True],
    deterministic=[False, True], mha_type=["mha", "mqa", "gqa"], dtype=DTYPES,
    kvpacked=[False, True], dropout_p=[0.0, 0.17], softcap=[0.0, 50.0])
CASES = [c for c in fixed_sample(GRID, 24, seed=21) if not (c["softcap"] and c["dropout_p"])]


def _inputs(c, batch=2):
    torch.manual_seed(0)
    sq, sk = c["seqlens"]
    h = 6 if c["softcap"] == 0 else 4
    hk = h if c["mha_type"] == "mha" else (1 if c["mha_type"] == "mqa" else 2)
    dt = c["dtype"]
    q = torch.randn(batch, sq, h, c["d"], dtype=dt)
    if c["softcap"]:
        q = q * c["softcap"]  # scores in the cap's range
    k = torch.randn(batch, sk, hk, c["d"], dtype=dt)
    v = torch.randn(batch, sk, hk, c["d"], dtype=dt)
    window = torch.randint(0, sk, (2,)) if c["local"] else (-1, -1)  # an int tensor
    alibi = torch.rand(batch, h, dtype=torch.float32) * 0.3 if c["alibi"] else None
    return q, k, v, window, alibi


def _keep_mask(s_dmask):
    """FlashAttention's encoding: a dropped entry is stored negated (the sign bit)."""
    return ~torch.signbit(s_dmask)


@pytest.mark.parametrize("c", CASES, ids=param_id)
def test_flash_attn_output(c):
    q0, k0, v0, window, alibi = _inputs(c)
    q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
    kv = torch.stack([k0, v0], dim=2).requires_grad_() if c["kvpacked"] else None
    p = c["dropout_p"]
    torch.manual_seed(1)
    opts = dict(causal=c["causal"], window_size=window, softcap=c["softcap"],
                alibi_slopes=alibi, deterministic=c["deterministic"], return_attn_probs=True)
    if c["kvpacked"]:
        out, lse, s_dmask = compat.flash_attn_kvpacked_func(q, kv, p, **opts)
    else:
        out, lse, s_dmask = compat.flash_attn_func(q, k, v, p, **opts)
    assert out.dtype == c["dtype"] and out.shape == q.shape and out.grad_fn is not None
    win = tuple(int(w) for w in window)
    ref = dict(causal=c["causal"], window=win, softcap=c["softcap"], alibi=alibi, p=p)
    drop = None
    if p > 0:
        assert s_dmask.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        drop = _keep_mask(s_dmask)
        ref["drop"] = drop
    else:
        assert s_dmask is None
    out_64, a_64 = attention_ref(q, k, v, **ref)
    out_lo, a_lo = attention_ref(q, k, v, dtype=c["dtype"], low=True, **ref)
    check_bound("out", out, out_lo, out_64, 2)
    if p > 0:
        probs = s_dmask.abs().double()
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-300)
        check_bound("probs", probs, a_lo, a_64, 2)
        visible = a_64 > 0
        frac = 1.0 - drop[visible].double().mean().item()
        assert abs(frac - p) <= (0.01 if not c["local"] else 0.025)
    g = torch.randn_like(out)
    if c["kvpacked"]:
        dq, dkv = torch.autograd.grad(out, (q, kv), g)
        dk, dv = dkv.unbind(2)
    else:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    want_64 = torch.autograd.grad(out_64, (q, k, v), g.double())
    want_lo = torch.autograd.grad(out_lo, (q, k, v), g)
    for name, got, lo, hi in zip(("dq", "dk", "dv"), (dq, dk, dv), want_lo, want_64):
        assert got.dtype == c["dtype"]
        check_bound(name, got, lo, hi, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attn_qkvpacked_and_lse(dtype):
    torch.manual_seed(0)
    qkv = torch.randn(2, 97, 3, 4, 64, dtype=dtype, requires_grad=True)
    out, lse, s = compat.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True)
    assert s is None
    q, k, v = qkv.unbind(2)
    out_64, _ = attention_ref(q, k, v, causal=True)
    out_lo, _ = attention_ref(q, k, v, causal=True, dtype=dtype, low=True)
    check_bound("out", out, out_lo, out_64, 2)
    sc = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / 8.0
    sc = sc.masked_fill(torch.ones(97, 97, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 97)
    assert err(lse, torch.logsumexp(sc, -1)) < 1e-4
    g = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, (qkv,), g)
    want_64 = torch.autograd.grad(out_64, (qkv,), g.double())[0]
    want_lo = torch.autograd.grad(out_lo, (qkv,), g)[0]
    check_bound("dqkv", dqkv, want_lo, want_64, 3)


def test_dropout_seed_comes_from_torch():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 33, 2, 32) for _ in range(3))
    torch.manual_seed(5)
    a = compat.flash_attn_func(q, k, v, 0.3)
    torch.manual_seed(5)
    b = compat.flash_attn_func(q, k, v, 0.3)
    c = compat.flash_attn_func(q, k, v, 0.3)
    assert torch.equal(a, b)  # torch.manual_seed repeats the draw
    assert not torch.equal(a, c)  # a fresh draw, fresh keep mask
    assert not torch.equal(a, compat.flash_attn_func(q, k, v))
    qt = q.transpose(1, 2)  # torch's SDPA layout
    torch.manual_seed(5)
    a = compat.scaled_dot_product_attention(qt, qt, qt, dropout_p=0.3)
    torch.manual_seed(5)
    assert torch.equal(a, compat.scaled_dot_product_attention(qt, qt, qt, dropout_p=0.3))
    assert not torch.equal(a, compat.scaled_dot_product_attention(qt, qt, qt))


# ---------------------------------------------------------------------------------------
# the varlen forms: padding masks turned into cu_seqlens (int32 tensors)
# ---------------------------------------------------------------------------------------
def _lengths(max_len, batch, gen_mode):
    if gen_mode == "full":
        return torch.full((batch,), max_len, dtype=torch.int32)
    return torch.randint(max(1, max_len - 20), max_len + 1, (batch,), dtype=torch.int32)


def _pack(x, lens):
    return torch.cat([x[b, :int(n)] for b, n in enumerate(lens)])


def _cu(lens):
    return torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)


VARLEN_GRID = dict(
    seqlens=[(113, 203), (128, 217), (97, 97), (203, 113), (1, 130)],
    d=[32, 59, 64, 80, 128], causal=[False, True], local=[False, True],
    alibi=[False, True], mha_type=["mha", "mqa", "gqa"], dtype=DTYPES,
    form=["split", "kvpacked", "qkvpacked"], dropout_p=[0.0, 0.17], softcap=[0.0, 50.0],
    deterministic=[False, True])
VARLEN_CASES = [c for c in fixed_sample(VARLEN_GRID, 14, seed=1172)
                if not (c["softcap"] and c["dropout_p"])]


@pytest.mark.parametrize("c", VARLEN_CASES, ids=param_id)
def test_flash_attn_varlen_output(c):
    if c["form"] == "qkvpacked":  # one length for q and k, as FlashAttention's test
        c = dict(c, seqlens=(c["seqlens"][0],) * 2, mha_type="mha")
    q0, k0, v0, window, alibi = _inputs(c, batch=3)
    torch.manual_seed(2)
    sq, sk = c["seqlens"]
    lq = _lengths(sq, 3, "random")
    lk = lq if c["form"] == "qkvpacked" else _lengths(sk, 3, "random")
    p = c["dropout_p"]
    opts = dict(causal=c["causal"], window_size=window, softcap=c["softcap"],
                alibi_slopes=alibi, deterministic=c["deterministic"], return_attn_probs=True)
    qs, ks, vs = (_pack(x, n).requires_grad_() for x, n in ((q0, lq), (k0, lk), (v0, lk)))
    mq, mk = lq.max(), lk.max()  # 0-d int tensors, as callers pass .max()
    if c["form"] == "qkvpacked":
        leaf = torch.stack([qs, ks, vs], 1).detach().requires_grad_()
        out, lse, s_dmask = compat.flash_attn_varlen_qkvpacked_func(leaf, _cu(lq), mq, p,
                                                                     **opts)
        qs, ks, vs = leaf.unbind(1)
    elif c["form"] == "kvpacked":
        leaf = torch.stack([ks, vs], 1).detach().requires_grad_()
        out, lse, s_dmask = compat.flash_attn_varlen_kvpacked_func(
            qs, leaf, _cu(lq), _cu(lk), mq, mk, p, **opts)
        ks, vs = leaf.unbind(1)
    else:
        leaf = None
        out, lse, s_dmask = compat.flash_attn_varlen_func(qs, ks, vs, _cu(lq), _cu(lk), mq,
                                                           mk, p, **opts)
    assert out.shape == qs.shape and lse.shape == (qs.shape[1], qs.shape[0])
    win = tuple(int(w) for w in window)
    # reference row by row (each row its own bottom-right alignment)
    outs = {"64": [], "lo": []}
    cq, ck = _cu(lq), _cu(lk)
    for b in range(3):
        qb = qs[cq[b]:cq[b + 1]][None]
        kb, vb = ks[ck[b]:ck[b + 1]][None], vs[ck[b]:ck[b + 1]][None]
        ref = dict(causal=c["causal"], window=win, softcap=c["softcap"], p=p,
                   alibi=None if alibi is None else alibi[b:b + 1])
        if p > 0:
            ref["drop"] = _keep_mask(s_dmask[b:b + 1, :, :int(lq[b]), :int(lk[b])])
        outs["64"].append(attention_ref(qb, kb, vb, **ref)[0][0])
        outs["lo"].append(attention_ref(qb, kb, vb, dtype=c["dtype"], low=True, **ref)[0][0])
    out_64, out_lo = torch.cat(outs["64"]), torch.cat(outs["lo"])
    check_bound("out", out, out_lo, out_64, 2)
    g = torch.randn_like(out)
    wrt = {"split": (qs, ks, vs), "kvpacked": (qs, leaf), "qkvpacked": (leaf,)}[c["form"]]
    got = torch.autograd.grad(out, wrt, g, retain_graph=True)
    want_64 = torch.autograd.grad(out_64, wrt, g.double(), retain_graph=True)
    want_lo = torch.autograd.grad(out_lo, wrt, g, retain_graph=True)
    for name, a, lo, hi in zip(("d0", "d1", "d2"), got, want_lo, want_64):
        check_bound(name, a, lo, hi, 3)


# ---------------------------------------------------------------------------------------
# paged varlen prefill (block_table in flash_attn_varlen_func)
# ---------------------------------------------------------------------------------------
def _paged(k, v, page, gen):
    """Scatter (B, S, Hk, D) k/v into shuffled pages: (k_pages, v_pages, block_table)."""
    b, s = k.shape[:2]
    nblk = -(-s // page)
    perm = torch.randperm(b * nblk, generator=gen).to(torch.int32)
    table = perm.reshape(b, nblk)
    kp = torch.zeros(b * nblk, page, *k.shape[2:], dtype=k.dtype)
    vp = torch.zeros_like(kp)
    for r in range(b):
        for j in range(nblk):
            kp[table[r, j], :min(page, s - j * page)] = k[r, j * page:(j + 1) * page]
            vp[table[r, j], :min(page, s - j * page)] = v[r, j * page:(j + 1) * page]
    return kp, vp, table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page,causal", [(16, True), (7, False), (256, True)])
def test_flash_attn_varlen_paged_kv(dtype, page, causal):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 41, 4, 64, dtype=dtype)
    k, v = torch.randn(3, 130, 2, 64, dtype=dtype), torch.randn(3, 130, 2, 64, dtype=dtype)
    lq = torch.tensor([41, 1, 17], dtype=torch.int32)
    lk = torch.tensor([130, 60, 97], dtype=torch.int32)
    kp, vp, table = _paged(k, v, page, gen)
    out = compat.flash_attn_varlen_func(_pack(q, lq), kp, vp, _cu(lq), _cu(lk), lq.max(),
                                        lk.max(), causal=causal, block_table=table)
    want = compat.flash_attn_varlen_func(_pack(q, lq), _pack(k, lk), _pack(v, lk), _cu(lq),
                                         _cu(lk), 41, 130, causal=causal)
    assert torch.equal(out, want)  # the same kernel reading the keys through the table
    cq = _cu(lq)
    for b in range(3):
        ref = attention_ref(q[b:b + 1, :lq[b]], k[b:b + 1, :lk[b]], v[b:b + 1, :lk[b]],
                            causal=causal)[0][0]
        low = attention_ref(q[b:b + 1, :lq[b]], k[b:b + 1, :lk[b]], v[b:b + 1, :lk[b]],
                            causal=causal, dtype=dtype, low=True)[0][0]
        check_bound("out", out[cq[b]:cq[b + 1]], low, ref, 2)
    qg = _pack(q, lq).requires_grad_()  # forward-only, as FlashAttention's: backward raises
    og = compat.flash_attn_varlen_func(qg, kp, vp, _cu(lq), _cu(lk), 41, 130, causal=causal,
                                       block_table=table)
    assert torch.equal(og.detach(), out)
    with pytest.raises(NotImplementedError, match="forward-only"):
        og.sum().backward()


# ---------------------------------------------------------------------------------------
# flash_attn_with_kvcache with integer tensors everywhere
# ---------------------------------------------------------------------------------------
KV_GRID = dict(paged=[None, 16, 256], new_kv=[False, True], causal=[False, True],
               local=[False, True], mha_type=["mha", "mqa", "gqa"], leftpad=[False, True],
               batch_idx=[False, True], d=[32, 59, 64, 128], seqlen_q=[1, 3])
KV_CASES = [c for c in fixed_sample(KV_GRID, 14, seed=1907)
            if not (c["paged"] and (c["leftpad"] or c["batch_idx"]))]


@pytest.mark.parametrize("c", KV_CASES, ids=param_id)
def test_flash_attn_kvcache(c):
    torch.manual_seed(0)
    dt = torch.float16
    b, s_cache, h, d, sq = 3, 300, 6, c["d"], c["seqlen_q"]
    hk = h if c["mha_type"] == "mha" else (1 if c["mha_type"] == "mqa" else 2)
    n_new = sq if c["new_kv"] else 0
    b_cache = b + 2 if c["batch_idx"] else b
    k_full = torch.randn(b_cache, s_cache, hk, d, dtype=dt)
    v_full = torch.randn(b_cache, s_cache, hk, d, dtype=dt)
    lens = torch.randint(0, s_cache - n_new + 1, (b,), dtype=torch.int32)
    idx = torch.randperm(b_cache)[:b].to(torch.int32) if c["batch_idx"] else None
    pad = None
    if c["leftpad"]:
        pad = torch.stack([torch.randint(0, int(n) + 1, ()) for n in lens]).to(torch.int32)
    q = torch.randn(b, sq, h, d, dtype=dt)
    k_new = torch.randn(b, n_new, hk, d, dtype=dt) if n_new else None
    v_new = torch.randn(b, n_new, hk, d, dtype=dt) if n_new else None
    window = torch.randint(0, s_cache, (2,)) if c["local"] else (-1, -1)
    rows = idx.long() if idx is not None else torch.arange(b)
    # expected cache contents and keys per row
    k_exp, v_exp = k_full[rows].clone(), v_full[rows].clone()
    for r in range(b):
        if n_new:
            k_exp[r, lens[r]:lens[r] + n_new] = k_new[r]
            v_exp[r, lens[r]:lens[r] + n_new] = v_new[r]
    if c["paged"]:
        kc, vc, table = _paged(k_full, v_full, c["paged"], torch.Generator().manual_seed(1))
    else:
        kc, vc, table = k_full.clone(), v_full.clone(), None
    out, lse = compat.flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, cache_seqlens=lens, cache_batch_idx=idx,
        cache_leftpad=pad, block_table=table, causal=c["causal"], window_size=window,
        return_softmax_lse=True)
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq)
    win = tuple(int(w) for w in window)
    for r in range(b):
        lo_, hi_ = (0 if pad is None else int(pad[r])), int(lens[r]) + n_new
        kr, vr = k_exp[r:r + 1, lo_:hi_], v_exp[r:r + 1, lo_:hi_]
        ref = attention_ref(q[r:r + 1], kr, vr, causal=c["causal"], window=win)[0]
        low = attention_ref(q[r:r + 1], kr, vr, causal=c["causal"], window=win, dtype=dt,
                            low=True)[0]
        check_bound(f"out[{r}]", out[r:r + 1], low, ref, 2)
        if n_new:  # written in place at cache_seqlens, cache_seqlens itself unchanged
            got = (torch.stack([kc[table[r, j // c["paged"]], j % c["paged"]]
                                for j in range(int(lens[r]), hi_)]) if c["paged"]
                   else kc[rows[r], int(lens[r]):hi_])
            assert torch.equal(got, k_new[r])


# ---------------------------------------------------------------------------------------
# what FlashAttention's callers catch and pass
# ---------------------------------------------------------------------------------------
def test_errors_are_runtime_errors_and_native():
    q = torch.zeros(2, 1, 2, 8)
    kc = torch.zeros(2, 8, 2, 8)
    for kw in (dict(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)),
               dict(cache_seqlens=1, block_table=torch.tensor([[0], [5]], dtype=torch.int32))):
        with pytest.raises(RuntimeError, match="cache_seqlens|block_table") as e:
            compat.flash_attn_with_kvcache(q, kc, kc.clone(), q, q, **kw)
        assert isinstance(e.value, AttentionError) and isinstance(e.value, ValueError)
    with pytest.raises(RuntimeError) as e:
        compat.flash_attn_func(q, q, q, causal="yes")
    assert isinstance(e.value, TypeError)
    with pytest.raises(RuntimeError, match="window_size"):
        compat.flash_attn_func(q, q, q, window_size=torch.tensor([1, 2, 3]))
    import pickle

    back = pickle.loads(pickle.dumps(e.value))  # named classes: errors cross processes
    assert type(back) is type(e.value) and str(back) == str(e.value)


@pytest.mark.parametrize("kind", ["int", "numpy", "np0d", "tensor0d", "tensor1"])
def test_integer_arguments_of_every_kind(kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    make = {"int": int, "numpy": np.int32, "np0d": lambda x: np.array(x),
            "tensor0d": lambda x: torch.tensor(x), "tensor1": lambda x: torch.tensor([x])}[kind]
    want = compat.flash_attn_func(q, k, v, window_size=(3, 1))
    got = compat.flash_attn_func(q, k, v, window_size=(make(3), make(1)))
    assert torch.equal(got, want)
    cu = torch.tensor([0, 9], dtype=torch.int32)
    got = compat.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, make(9), make(9),
                                        window_size=(make(3), make(1)))
    assert torch.equal(got, want[0])
    kc = k.clone()
    got = compat.flash_attn_with_kvcache(q[:, -1:], kc, v.clone(), cache_seqlens=make(9),
                                         window_size=(make(3), make(1)))
    torch.testing.assert_close(got, want[:, -1:], rtol=1e-5, atol=1e-6)  # decode kernel
    with pytest.raises(TypeError, match="max_seqlen_q"):
        compat.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 9.0, 9)
