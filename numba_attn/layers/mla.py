"""Multi-head latent attention (DeepSeek-V2/V3) and its compressed cache.

Keys and values of every head are rebuilt from one low-rank latent per token
``c = RMSNorm(x W_DKV)`` (``kv_lora_rank`` wide) plus one rotary key shared by all heads
(``qk_rope_head_dim`` wide)::

    k_h = [c W_UK_h ; rope(k_pe)]        v_h = c W_UV_h          (W_UK, W_UV from kv_b_proj)

Prefill without a cache runs this "naive" form: ordinary attention over per-head keys of
``qk_nope_head_dim + qk_rope_head_dim`` and values of ``v_head_dim``. With an
:class:`MLACache` only ``[c ; rope(k_pe)]`` is stored per token, and attention runs in the
"absorbed" form (DeepSeek-V2, section 2.1.3): ``W_UK`` is folded into the query and ``W_UV``
into the output, so every head attends over the latent cache as ONE shared kv head::

    q_h' = [q_nope_h W_UK_h^T ; rope(q_pe_h)]         (kv_lora_rank + qk_rope_head_dim)
    o_h  = softmax(scale q_h' [c ; k_pe]^T) c  W_UV_h^T

through the same attention kernels (value dim ``kv_lora_rank``; the kernel reads the value
straight from the latent columns of the cache, nothing is gathered or copied).
"""
from __future__ import annotations

import math

import numpy as np

from .. import dispatch as dp
from .. import quant
from ..config import AttentionConfig, AttentionError, check_flag, check_real
from . import hf_config
from .device import require_cuda, to_device_if, to_host
from .params import ParameterMixin
from .projections import check_hidden, check_positions, linear
from .rotary import RotaryTable

__all__ = ["MultiHeadLatentAttention", "MLACache"]


class MLACache:
    """Compressed cache of multi-head latent attention: ``[latent ; rope key]`` per token.

    Parameters
    ----------
    batch : int
    max_seqlen : int
    kv_lora_rank : int
        Width of the normalised latent ``c``.
    qk_rope_head_dim : int
        Width of the shared (rotated) rope key.
    dtype : numpy dtype, default float32
        float32 or float64; or 8-bit storage (CPU or CUDA) for a float32 layer: ``np.int8``,
        ``ml_dtypes.float8_e4m3fn`` or ``ml_dtypes.float8_e5m2`` with ONE float32 scale
        per token for its whole ``[latent ; rope key]`` row (``scale``, absmax / qmax as
        :func:`numba_attn.quant.quantize`). One scale, not one per part: the absorbed
        attention reads the value from the latent columns of the key row itself, and
        the kernels apply one scale per stored row (to the score and to the value), so
        a second scale inside a row has no place there; a rope key much smaller than
        the latent is stored with the latent's step (its relative error grows by the
        ratio).
    device : {"cpu", "cuda"}, default "cpu"
        "cuda" keeps the storage on the GPU (a numba device array): new entries are
        appended there and the absorbed attention reads it in place on the CUDA backend
        (the layer's projections stay on the host; only the new entries, the absorbed
        queries and the latent outputs travel).

    Attributes
    ----------
    kv : array (batch, max_seqlen, 1, kv_lora_rank + qk_rope_head_dim)
        Storage: ``kv[b, t, 0, :kv_lora_rank]`` is token t's latent, the rest its rope key.
        A numpy array, or a numba device array for ``device="cuda"``.
    scale : ndarray (batch, max_seqlen, 1) float32, or None
        8-bit caches: token t of row b is ``scale[b, t, 0] * kv[b, t, 0]`` (on the cache's
        device; quantized there on append); None otherwise.
    seqlens : ndarray (batch,) int32
        Valid tokens per row.

    Examples
    --------
    >>> from numba_attn import MLACache
    >>> cache = MLACache(2, 4096, kv_lora_rank=512, qk_rope_head_dim=64)
    >>> cache.kv.shape, cache.bytes_per_token
    ((2, 4096, 1, 576), 2304)
    """

    def __init__(self, batch, max_seqlen, kv_lora_rank, qk_rope_head_dim, dtype=np.float32,
                 device="cpu"):
        for name, v in (("batch", batch), ("max_seqlen", max_seqlen),
                        ("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", qk_rope_head_dim)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise AttentionError(f"{name}: expected a positive int, got {v!r}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: not a numpy dtype: {dtype!r}") from None
        if dt not in (np.float32, np.float64) and not quant.is_quantized(dt):
            raise TypeError(f"dtype: an MLACache stores float32, float64, int8, "
                            f"float8_e4m3fn or float8_e5m2, got {dt}")
        if device not in ("cpu", "cuda"):
            raise AttentionError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        self.batch, self.max_seqlen = int(batch), int(max_seqlen)
        self.kv_lora_rank, self.qk_rope_head_dim = int(kv_lora_rank), int(qk_rope_head_dim)
        self.dtype, self.device = dt, device
        shape = (self.batch, self.max_seqlen, 1, self.head_dim)
        if device == "cuda":
            require_cuda()
            from numba import cuda

            self.kv = cuda.device_array(shape, dt)  # never read outside the valid prefix
        else:
            self.kv = np.zeros(shape, dt)
        self.quantized = quant.is_quantized(dt)
        self.scale = None
        if self.quantized:
            self.scale = (cuda.device_array(shape[:3], np.float32) if device == "cuda"
                          else np.zeros(shape[:3], np.float32))
        self.seqlens = np.zeros(self.batch, np.int32)

    @property
    def head_dim(self):
        """Width of one cached token: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def bytes_per_token(self):
        """Cache bytes per token: (kv_lora_rank + qk_rope_head_dim) * itemsize (+ 4 for the
        float32 scale of an 8-bit cache)."""
        return self.head_dim * self.dtype.itemsize + 4 * self.quantized

    def dequantized_prefix(self, row):
        """Row ``row``'s valid tokens as float32 host arrays (seqlens[row], head_dim):
        ``scale * kv`` for an 8-bit cache, a float32 copy otherwise."""
        n = int(self.seqlens[row])
        host = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else a  # noqa: E731
        kv = host(self.kv[row, :n, 0])
        if not self.quantized:
            return np.asarray(kv, np.float32)
        return quant.dequantize(kv, host(self.scale[row, :n, 0]))

    @property
    def latent(self):
        """View (batch, max_seqlen, kv_lora_rank) of the latents."""
        return self.kv[:, :, 0, :self.kv_lora_rank]

    @property
    def rope_key(self):
        """View (batch, max_seqlen, qk_rope_head_dim) of the rotated shared keys."""
        return self.kv[:, :, 0, self.kv_lora_rank:]

    def reset(self):
        """Empty every row (storage is kept, not cleared)."""
        self.seqlens[:] = 0

    def _reserve(self, n_new):
        old = self.seqlens.astype(np.int64)
        if old.min() < 0 or old.max() > self.max_seqlen:
            raise AttentionError(f"cache.seqlens: entries must lie in [0, {self.max_seqlen}]")
        new = old + n_new
        if (new > self.max_seqlen).any():
            b = int(np.argmax(new > self.max_seqlen))
            raise AttentionError(f"cache: overflow, row {b} holds {old[b]} of "
                                 f"{self.max_seqlen} positions and {n_new} more do not fit")
        return old, new

    def _write(self, old, entries):
        """entries (batch, n, head_dim) at positions old[b] .. old[b] + n - 1."""
        n = entries.shape[1]
        if self.device == "cuda":  # one append kernel: O(new entries), not O(cache)
            from numba import cuda

            from ..cuda import cache_ops

            slots = (np.arange(self.batch, dtype=np.int64)[:, None] * self.max_seqlen
                     + old[:, None] + np.arange(n, dtype=np.int64)[None, :]).reshape(-1)
            store = self.kv.reshape(self.batch * self.max_seqlen, 1, self.head_dim)
            if self.quantized:  # one (token, "head") row each: one scale per token
                new = cuda.to_device(np.ascontiguousarray(entries, dtype=np.float32))
                cache_ops.append_quantized(
                    store, self.scale.reshape(self.batch * self.max_seqlen, 1),
                    cuda.to_device(slots), new, self.batch * n, self.dtype)
            else:
                new = cuda.to_device(np.ascontiguousarray(entries, dtype=self.dtype))
                cache_ops.append_rows(store, cuda.to_device(slots), new, self.batch * n)
        elif self.quantized:  # one scale per token over [latent ; rope key]
            vals, scales = quant.quantize(entries, self.dtype)
            for b in range(self.batch):
                self.kv[b, old[b]:old[b] + n, 0] = vals[b]
                self.scale[b, old[b]:old[b] + n, 0] = scales[b]
        else:
            for b in range(self.batch):
                self.kv[b, old[b]:old[b] + n, 0] = entries[b]
        self.seqlens[:] = old + n

    def __repr__(self):
        dev = "" if self.device == "cpu" else f", device={self.device!r}"
        return (f"MLACache(batch={self.batch}, max_seqlen={self.max_seqlen}, kv_lora_rank="
                f"{self.kv_lora_rank}, qk_rope_head_dim={self.qk_rope_head_dim}{dev}, "
                f"seqlens={self.seqlens.tolist()})")


def yarn_mscale(factor, mscale=1.0):
    """DeepSeek's YaRN scale factor ``0.1 * mscale * ln(factor) + 1`` (1 if factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _is_yarn(scaling):
    return bool(scaling) and scaling.get("rope_type", scaling.get("type")) == "yarn"


class MultiHeadLatentAttention(ParameterMixin):
    """DeepSeek-V2/V3 multi-head latent attention.

    Parameters
    ----------
    hidden_size, num_heads : int
    kv_lora_rank : int
        Latent width (512 in DeepSeek-V2/V3).
    qk_nope_head_dim, qk_rope_head_dim, v_head_dim : int
        Per-head widths of the non-rotary query/key part, the rotary part (shared key)
        and the value (128, 64, 128 in DeepSeek-V3).
    q_lora_rank : int, optional
        Low-rank query (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``); ``None``
        uses one ``q_proj`` (DeepSeek-V2-Lite).
    attention_bias : bool, default False
        Biases on q_a_proj, kv_a_proj_with_mqa and o_proj (as Hugging Face's config).
    norm_eps : float, default 1e-6
    rope_theta : float, default 10000.0
    rope_scaling : dict, optional
        DeepSeek's ``{"type": "yarn", "factor", "original_max_position_embeddings",
        "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}`` (Hugging Face's yarn,
        as :func:`numba_attn.rotary_cos_sin`), or anything else that function accepts.
        A ``mscale_all_dim`` multiplies the softmax scale by
        ``yarn_mscale(factor, mscale_all_dim) ** 2``.
    rotary_interleaved : bool, default True
        DeepSeek rotates interleaved channel pairs.
    causal : bool, default True
    scale : float, default (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 (times mscale**2)
    dtype : float32 or float64, default float32
    seed : int, optional
    backend : str, default "auto"

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn import MLACache, MultiHeadLatentAttention
    >>> mla = MultiHeadLatentAttention(64, 4, q_lora_rank=24, kv_lora_rank=16,
    ...                                qk_nope_head_dim=8, qk_rope_head_dim=4,
    ...                                v_head_dim=8, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((1, 6, 64), dtype=np.float32)
    >>> cache = MLACache(1, 32, kv_lora_rank=16, qk_rope_head_dim=4)
    >>> y = np.concatenate([mla(x[:, :5], cache=cache), mla(x[:, 5:], cache=cache)], 1)
    >>> bool(np.allclose(y, mla(x), atol=1e-5))       # absorbed decode == naive prefill
    True
    """

    _aliases = {"out_proj.weight": "o_proj.weight", "out_proj.bias": "o_proj.bias"}

    def __init__(self, hidden_size, num_heads, *, kv_lora_rank, qk_nope_head_dim,
                 qk_rope_head_dim, v_head_dim, q_lora_rank=None, attention_bias=False,
                 norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                 rotary_interleaved=True, causal=True, scale=None, dtype=np.float32,
                 seed=None, backend="auto"):
        sizes = dict(hidden_size=hidden_size, num_heads=num_heads, kv_lora_rank=kv_lora_rank,
                     qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                     v_head_dim=v_head_dim)
        if q_lora_rank is not None:
            sizes["q_lora_rank"] = q_lora_rank
        for name, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise AttentionError(f"{name}: expected a positive int, got {v!r}")
        if qk_rope_head_dim % 2:
            raise AttentionError(f"qk_rope_head_dim: must be even, got {qk_rope_head_dim}")
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {dt}")
        self.hidden_size, self.num_heads = int(hidden_size), int(num_heads)
        self.kv_lora_rank, self.q_lora_rank = int(kv_lora_rank), q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = int(qk_nope_head_dim), int(qk_rope_head_dim)
        self.v_head_dim = int(v_head_dim)
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.attention_bias = bool(attention_bias)
        self.norm_eps = float(norm_eps)
        self.causal = bool(causal)
        self.rotary_interleaved = bool(rotary_interleaved)
        self.dtype, self.backend = dt, backend
        if scale is None:
            scale = self.qk_head_dim ** -0.5
            sc = rope_scaling or {}
            if sc.get("mscale_all_dim") and "factor" in sc:
                scale *= yarn_mscale(float(sc["factor"]), float(sc["mscale_all_dim"])) ** 2
        # the naive form's config (validates scale)
        self.config = AttentionConfig(num_heads=self.num_heads, num_kv_heads=self.num_heads,
                                      head_dim=self.qk_head_dim, head_dim_v=self.v_head_dim,
                                      scale=scale, causal=self.causal)
        self.scale = self.config.scale
        self.rope_theta = check_real("rope_theta", rope_theta)
        self.rope_scaling = rope_scaling
        from ..rope import check_scaling

        if _is_yarn(rope_scaling):  # DeepSeek's default pre-training length
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("original_max_position_embeddings", 4096)
        try:
            rope_scaling = check_scaling(rope_scaling, self.qk_rope_head_dim)
        except AttentionError as e:
            raise AttentionError(f"rope_scaling: {e}") from None
        # yarn (DeepSeek) and every other type: Hugging Face's formulas (rope.py)
        self._rope = RotaryTable(self.qk_rope_head_dim, self.rope_theta, rope_scaling, dt)
        rng = np.random.default_rng(seed)
        for name, attr, shape in self._param_specs():
            if "layernorm" in name:
                val = np.ones(shape, dt)
            elif name.endswith(".bias"):
                val = np.zeros(shape, dt)
            else:
                val = (rng.standard_normal(shape) / math.sqrt(shape[1])).astype(dt)
            setattr(self, attr, val)
        for attr in ("w_q", "w_q_a", "b_q_a", "q_a_norm", "w_q_b", "b_kv_a", "b_o"):
            if not hasattr(self, attr):
                setattr(self, attr, None)

    @classmethod
    def from_hf_config(cls, config, **kw):
        """Build from a DeepSeek-V2/V3 ``config.json`` dict (hidden_size,
        num_attention_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
        v_head_dim, attention_bias, rms_norm_eps, rope_theta, rope_scaling,
        rope_interleave); ``kw`` overrides.

        Accepts a dict or an object with ``to_dict()``; raises ``AttentionError`` naming
        a missing key or a config without ``kv_lora_rank``.

        Examples
        --------
        >>> from numba_attn import MultiHeadLatentAttention
        >>> cfg = {"model_type": "deepseek_v2", "hidden_size": 64, "num_attention_heads": 4,
        ...        "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
        ...        "v_head_dim": 8, "q_lora_rank": None}
        >>> mla = MultiHeadLatentAttention.from_hf_config(cfg, seed=0)
        >>> mla.new_cache(1, 32).bytes_per_token
        80
        """
        hidden, h, args = hf_config.mla_args(config)
        args.update(kw)
        return cls(hidden, h, **args)

    def _param_specs(self):
        e, h, r = self.hidden_size, self.num_heads, self.kv_lora_rank
        specs = []
        if self.q_lora_rank is None:
            specs.append(("q_proj.weight", "w_q", (h * self.qk_head_dim, e)))
        else:
            ql = int(self.q_lora_rank)
            specs.append(("q_a_proj.weight", "w_q_a", (ql, e)))
            if self.attention_bias:
                specs.append(("q_a_proj.bias", "b_q_a", (ql,)))
            specs += [("q_a_layernorm.weight", "q_a_norm", (ql,)),
                      ("q_b_proj.weight", "w_q_b", (h * self.qk_head_dim, ql))]
        specs.append(("kv_a_proj_with_mqa.weight", "w_kv_a", (r + self.qk_rope_head_dim, e)))
        if self.attention_bias:
            specs.append(("kv_a_proj_with_mqa.bias", "b_kv_a", (r + self.qk_rope_head_dim,)))
        specs += [("kv_a_layernorm.weight", "kv_a_norm", (r,)),
                  ("kv_b_proj.weight", "w_kv_b",
                   (h * (self.qk_nope_head_dim + self.v_head_dim), r)),
                  ("o_proj.weight", "w_o", (e, h * self.v_head_dim))]
        if self.attention_bias:
            specs.append(("o_proj.bias", "b_o", (e,)))
        return specs

    def __call__(self, x, **kw):
        return self.forward(x, **kw)

    def __repr__(self):
        return (f"MultiHeadLatentAttention(hidden_size={self.hidden_size}, num_heads="
                f"{self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank="
                f"{self.kv_lora_rank}, qk_nope_head_dim={self.qk_nope_head_dim}, "
                f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.v_head_dim})")

    def new_cache(self, batch, max_seqlen, device="cpu", dtype=None):
        """An empty :class:`MLACache` sized for this layer (``device="cuda"``: on the GPU;
        ``dtype`` default the layer's, or an 8-bit storage dtype)."""
        return MLACache(batch, max_seqlen, self.kv_lora_rank, self.qk_rope_head_dim,
                        self.dtype if dtype is None else dtype, device)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x, *, positions=None, cache=None, kv_lens=None, mask=None, backend=None,
                train=False, dropout_p=0.0, seed=None):
        """Run the layer: naive form without a cache, absorbed form with one.

        Parameters
        ----------
        x : ndarray (batch, seqlen, hidden_size)
        positions : int array (seqlen,) or (batch, seqlen), optional
            Rotary positions; default ``0 .. seqlen - 1`` or, with a cache, each row's
            current length onward.
        cache : MLACache, optional
            The new latents are appended, then the queries attend to the whole cache.
        kv_lens : int array (batch,), optional
            Key padding (no cache).
        mask : bool array broadcastable to (batch, num_heads, seqlen, seqlen_kv), optional
        backend : {"auto", "cpu", "cuda", "reference"}, default None
            None means the layer's own ``backend`` (the constructor's, "auto" by default);
            a name overrides it for this call. ``train=True`` runs on it as well.
        train : bool, default False
            Naive form, keeping what :meth:`backward` needs (no cache).
        dropout_p, seed : float, int, optional
            Attention dropout (``train=True`` only), as :func:`numba_attn.attention`.

        Returns
        -------
        y : ndarray (batch, seqlen, hidden_size)
        """
        if check_flag("train", train):
            from .mla_train import mla_forward_train

            return mla_forward_train(self, x, positions=positions, cache=cache,
                                     kv_lens=kv_lens, mask=mask, backend=backend,
                                     dropout_p=dropout_p, seed=seed)
        if dropout_p:
            raise AttentionError("dropout_p: only with train=True (inference has no dropout)")
        from ..norm import rms_norm

        dt, h = self.dtype, self.num_heads
        backend = self.backend if backend is None else backend
        x = check_hidden("x", x, self.hidden_size, dt)
        bsz, sq, _ = x.shape
        if cache is not None:
            if not isinstance(cache, MLACache):
                raise TypeError(f"cache: expected an MLACache, got {type(cache).__name__}")
            cdt = np.float32 if cache.quantized else cache.dtype  # 8-bit: float32 layers
            if (cache.batch, cache.kv_lora_rank, cache.qk_rope_head_dim, cdt) != (
                    bsz, self.kv_lora_rank, self.qk_rope_head_dim, dt):
                raise AttentionError(
                    f"cache: expected batch={bsz}, kv_lora_rank={self.kv_lora_rank}, "
                    f"qk_rope_head_dim={self.qk_rope_head_dim}, dtype={dt}; got {cache!r} "
                    f"of dtype {cache.dtype} (8-bit caches serve float32 layers)")
            if kv_lens is not None:
                raise AttentionError("kv_lens: not used with a cache (it knows each row's "
                                     "length)")
            old, new = cache._reserve(sq)  # overflow raises before anything is written
        if positions is not None:
            positions = check_positions(positions, bsz, sq)
        elif cache is not None:
            positions = old[:, None] + np.arange(sq, dtype=np.int64)[None, :]
        else:
            positions = np.broadcast_to(np.arange(sq, dtype=np.int64), (bsz, sq))
        if self.q_lora_rank is None:
            q = linear(x, self.w_q)
        else:
            q = linear(rms_norm(linear(x, self.w_q_a, self.b_q_a), self.q_a_norm, eps=self.norm_eps), self.w_q_b)
        q = q.reshape(bsz, sq, h, self.qk_head_dim)
        r, dn = self.kv_lora_rank, self.qk_nope_head_dim
        ckv = linear(x, self.w_kv_a, self.b_kv_a)
        c = rms_norm(ckv[..., :r], self.kv_a_norm, eps=self.norm_eps)
        k_pe = self._rope.rotate(np.ascontiguousarray(ckv[..., None, r:]), positions,
                                 self.rotary_interleaved)  # (b, s, 1, rope)
        q_pe = self._rope.rotate(np.ascontiguousarray(q[..., dn:]), positions,
                                 self.rotary_interleaved)
        w_kv_b = self.w_kv_b.reshape(h, dn + self.v_head_dim, r)
        if cache is None:
            o = self._naive(q[..., :dn], q_pe, c, k_pe, w_kv_b, kv_lens, mask, backend)
        else:
            o = self._absorbed(q[..., :dn], q_pe, c, k_pe, w_kv_b, cache, old, new, mask,
                               backend)
        return linear(o.reshape(bsz, sq, h * self.v_head_dim), self.w_o, self.b_o)

    def backward(self, dy):
        """Gradients of the last ``forward(..., train=True)`` call: ``(dx, grads)``, grads
        keyed like :meth:`state_dict`.

        Examples
        --------
        >>> import numpy as np
        >>> from numba_attn import MultiHeadLatentAttention
        >>> mla = MultiHeadLatentAttention(16, 2, kv_lora_rank=8, qk_nope_head_dim=4,
        ...                                qk_rope_head_dim=2, v_head_dim=4, seed=0)
        >>> x = np.random.default_rng(0).standard_normal((1, 3, 16), dtype=np.float32)
        >>> dx, grads = mla.backward(np.ones_like(mla.forward(x, train=True)))
        >>> dx.shape, "kv_b_proj.weight" in grads
        ((1, 3, 16), True)
        """
        from .mla_train import mla_backward

        return mla_backward(self, dy)

    def _naive(self, q_nope, q_pe, c, k_pe, w_kv_b, kv_lens, mask, backend):
        from ..functional import attention

        bsz, sk, h = c.shape[0], c.shape[1], self.num_heads
        kv = (c @ w_kv_b.reshape(-1, self.kv_lora_rank).T).reshape(bsz, sk, h, -1)
        k = np.concatenate([kv[..., :self.qk_nope_head_dim],
                            np.broadcast_to(k_pe, (bsz, sk, h, self.qk_rope_head_dim))], -1)
        q = np.concatenate([q_nope, q_pe], -1)
        v = np.ascontiguousarray(kv[..., self.qk_nope_head_dim:])
        qd, kd, vd = to_device_if(backend, q, k, v)
        o = attention(qd, kd, vd, causal=self.causal, scale=self.scale, kv_lens=kv_lens,
                      mask=mask, backend=backend)
        return to_host(o)

    def _absorbed(self, q_nope, q_pe, c, k_pe, w_kv_b, cache, old, new, mask, backend):
        from ..functional import build_problem, run_and_finish

        bsz, sq, h, dn = q_nope.shape
        r, d = self.kv_lora_rank, cache.head_dim
        w_uk = w_kv_b[:, :dn]  # (h, dn, r)
        w_uv = w_kv_b[:, dn:]  # (h, dv, r)
        # q_nope_h W_UK_h: (h, b*s, dn) @ (h, dn, r) -> (h, b*s, r)
        q_lat = np.matmul(q_nope.reshape(bsz * sq, h, dn).transpose(1, 0, 2), w_uk)
        q_abs = np.empty((bsz * sq, h, d), self.dtype)
        q_abs[..., :r] = q_lat.transpose(1, 0, 2)
        q_abs[..., r:] = q_pe.reshape(bsz * sq, h, -1)
        rows = np.zeros((bsz, 5), np.int64)
        rows[:, 0] = np.arange(bsz) * sq
        rows[:, 1] = sq
        rows[:, 2] = np.arange(bsz) * cache.max_seqlen
        rows[:, 3] = new
        rows[:, 4] = new - sq
        store = cache.kv.reshape(bsz * cache.max_seqlen, 1, d)
        on_dev = cache.device == "cuda"
        if on_dev:  # a device cache: the absorbed attention runs where the cache lives
            require_cuda()
            q_abs, = to_device_if("cuda", q_abs)
        # the value is the latent part of the key: give the kernel the same storage as
        # value (head_dim_v = d) and keep the first kv_lora_rank output channels
        p = build_problem(
            q=q_abs, k=store, v=store, rows=rows, block_table=np.zeros((bsz, 1), np.int32),
            block_size=dp.CONTIGUOUS_BLOCK, max_seqlen_q=sq, max_seqlen_k=int(new.max()),
            batch=bsz, causal=self.causal, window=(-1, -1), scale=self.scale, softcap=0.0,
            alibi_slopes=None, bias=None, mask=mask, sinks=None, has_kv_lens=False,
            out_dtype=self.dtype, device="cuda" if on_dev else "cpu")
        if cache.quantized:  # key and value are one row: one scale serves both
            sc = cache.scale.reshape(bsz * cache.max_seqlen, 1)  # a view: filled below
            p.extra["kv_scales"] = (sc, sc)
        be = dp.select(p, backend)  # an unusable backend raises before the cache is written
        entries = np.concatenate([c, k_pe[:, :, 0]], axis=-1)
        if cache.quantized and not np.isfinite(entries).all():
            raise AttentionError(f"x: a {cache.dtype} MLACache stores finite values only "
                                 "(its latents / rope keys have inf or nan)")
        cache._write(old, entries)
        if cache.quantized and be.name not in ("cpu", "cuda"):  # others: float32 copies
            p = quant.dequantized(p)
        o, _ = run_and_finish(p, backend, None, (bsz * sq, h, d))
        if on_dev:
            o = o.copy_to_host()  # (b*s, h, d): the latent outputs (and d - r rope channels)
        o_lat = o[..., :r].transpose(1, 0, 2)  # (h, b*s, r)
        o = np.matmul(o_lat, w_uv.transpose(0, 2, 1))  # (h, b*s, dv)
        return o.transpose(1, 0, 2).reshape(bsz, sq, h, self.v_head_dim)
