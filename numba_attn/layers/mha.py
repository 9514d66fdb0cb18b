"""Attention layers in numpy + numba_attn: :class:`MultiHeadAttention` (MHA, GQA, MQA).

Weights use Hugging Face's Linear layout ``(out_features, in_features)`` and names
(``q_proj.weight`` ...), so a layer loads straight from a model's safetensors file.
Projections run through numpy's BLAS; attention runs through :func:`numba_attn.attention`
or, with a cache, :func:`numba_attn.attention_with_kvcache`, on the CPU or CUDA backend.
The training forward and the backward are in mha_train.py; the multi-head latent
attention of DeepSeek-V2/V3 is in mla.py.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ..config import AttentionConfig, AttentionError, check_flag, check_int, check_real
from ..interop import Array, like, to_numpy
from . import hf_config
from .device import require_cuda, to_device_if, to_host
from .params import ParameterMixin
from .projections import check_hidden, check_lora, check_positions, linear
from .rotary import RotaryTable

__all__ = ["MultiHeadAttention"]


# ---------------------------------------------------------------------------------------
# MultiHeadAttention
# ---------------------------------------------------------------------------------------
class MultiHeadAttention(ParameterMixin):
    """Multi-head attention with grouped/multi-query kv heads, as in Llama, Mistral, Qwen.

    ``y = o_proj(attention(rope(norm(q_proj(x))), rope(norm(k_proj(src))), v_proj(src)))``
    with ``src = context`` for cross-attention and ``src = x`` otherwise.

    Parameters
    ----------
    hidden_size : int
    num_heads : int
    num_kv_heads : int, default num_heads
        Must divide ``num_heads``; 1 is multi-query attention.
    head_dim : int, default hidden_size // num_heads
    qkv_bias, out_bias : bool, default False
        Biases on the q/k/v projections (Qwen2) and on the output projection.
    qk_norm : bool, default False
        RMSNorm over head_dim of q and k, before rotary (Qwen3).
    norm_eps : float, default 1e-6
    rope_theta : float, optional
        Rotary base; ``None`` disables rotary embeddings.
    rope_scaling : dict, optional
        Hugging Face ``rope_scaling`` (``linear``, ``llama3``).
    partial_rotary_factor : float, default 1.0
        Rotary acts on the first ``int(head_dim * partial_rotary_factor)`` channels.
    rotary_interleaved : bool, default False
        GPT-J pairs ``(2i, 2i+1)`` instead of GPT-NeoX halves.
    causal : bool, default True
    sliding_window : int, optional
        Hugging Face meaning: a token sees itself and the previous ``sliding_window - 1``
        tokens (kernel window ``(sliding_window - 1, 0)``; symmetric when not causal).
    softcap : float, default 0.0
        Attention-logit soft-capping (Gemma 2); 0 disables it.
    scale : float, default head_dim ** -0.5
    dtype : numpy dtype, default float32
        Weights and compute dtype.
    weight_dtype : numpy dtype, default dtype
        Dtype the projection matrices are kept in: ``dtype``, or ``ml_dtypes.bfloat16``
        with float32 ``dtype`` (half the memory; decode steps widen the weights in
        registers, longer inputs one matrix at a time).
    seed : int, optional
        Seed of the random initial weights (normal, std ``in_features ** -0.5``).
    backend : {"auto", "cpu", "cuda", "reference"}, default "auto"
        Where attention runs; with ``"cuda"`` host activations are copied to the GPU for
        the attention step only.

    Attributes
    ----------
    w_q : ndarray (num_heads * head_dim, hidden_size)
    w_k, w_v : ndarray (num_kv_heads * head_dim, hidden_size)
    w_o : ndarray (hidden_size, num_heads * head_dim)
    b_q, b_k, b_v, b_o : ndarray or None
    q_norm, k_norm : ndarray (head_dim,) or None

    Examples
    --------
    >>> import numpy as np
    >>> from numba_attn import MultiHeadAttention
    >>> layer = MultiHeadAttention.gqa(64, num_heads=8, num_kv_heads=2, rope_theta=1e4,
    ...                                seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 64), dtype=np.float32)
    >>> layer(x).shape, layer.is_gqa
    ((2, 5, 64), True)
    """

    _aliases = {"out_proj.weight": "o_proj.weight", "out_proj.bias": "o_proj.bias",
                "dense.weight": "o_proj.weight", "dense.bias": "o_proj.bias"}  # dense: Phi

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 rope_theta: float | None = None, rope_scaling: dict | None = None,
                 partial_rotary_factor: float = 1.0, rotary_interleaved: bool = False,
                 causal: bool = True, sliding_window: int | None = None,
                 softcap: float = 0.0, scale: float | None = None,
                 dtype: DTypeLike = np.float32, weight_dtype: DTypeLike | None = None,
                 seed: int | None = None,
                 backend: str = "auto") -> None:
        hidden_size = check_int("hidden_size", hidden_size, lo=1)
        num_heads = check_int("num_heads", num_heads, lo=1)
        if num_kv_heads is not None:
            num_kv_heads = check_int("num_kv_heads", num_kv_heads, lo=1)
        if head_dim is None:
            if hidden_size % num_heads:
                raise AttentionError(f"head_dim: hidden_size={hidden_size} is not divisible "
                                     f"by num_heads={num_heads}; give head_dim explicitly")
            head_dim = hidden_size // num_heads
        head_dim = check_int("head_dim", head_dim, lo=1)
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: not a numpy dtype: {dtype!r}") from None
        if dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"dtype: expected float16, float32 or float64, got {dtype}")
        weight_dtype = dtype if weight_dtype is None else np.dtype(weight_dtype)
        if weight_dtype != dtype and not (weight_dtype.name == "bfloat16"
                                          and dtype == np.float32):
            raise TypeError(f"weight_dtype: expected {dtype} (the dtype) or bfloat16 with "
                            f"float32 dtype, got {weight_dtype}")
        if sliding_window is not None:
            sliding_window = check_int("sliding_window", sliding_window, lo=1, hi=None)
        self.hidden_size = hidden_size
        self.causal = check_flag("causal", causal)
        self.sliding_window = sliding_window
        if self.sliding_window is None:
            window = (-1, -1)
        else:
            w = self.sliding_window - 1
            window = (w, 0) if self.causal else (w, w)
        # validates heads, head_dim, scale, softcap, window in one place
        self.config = AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                      head_dim=head_dim, scale=scale,
                                      causal=self.causal, window=window, softcap=softcap)
        self.num_heads = self.config.num_heads
        self.num_kv_heads = self.config.num_kv_heads
        self.head_dim = self.config.head_dim
        self.scale = self.config.scale
        self.softcap = self.config.softcap
        self.qkv_bias = check_flag("qkv_bias", qkv_bias)
        self.out_bias = check_flag("out_bias", out_bias)
        self.qk_norm = check_flag("qk_norm", qk_norm)
        self.norm_eps = check_real("norm_eps", norm_eps)
        if self.norm_eps < 0:
            raise AttentionError(f"norm_eps: must be >= 0, got {norm_eps!r}")
        self.dtype = dtype
        self.weight_dtype = weight_dtype
        self.backend = backend
        self.rotary_interleaved = check_flag("rotary_interleaved", rotary_interleaved)
        self.rope_theta = None if rope_theta is None else check_real("rope_theta", rope_theta)
        if self.rope_theta is not None and self.rope_theta <= 1.0:
            raise AttentionError(f"rope_theta: must be > 1, got {rope_theta!r}")
        self.partial_rotary_factor = check_real("partial_rotary_factor",
                                                partial_rotary_factor)
        self.rotary_dim = 0
        self._rope = None
        self.rope_scaling = rope_scaling
        if self.rope_theta is not None:
            self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
            if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
                raise AttentionError(
                    f"partial_rotary_factor: head_dim * factor = {self.rotary_dim} must be an "
                    f"even number in [2, head_dim={self.head_dim}]")
            from ..rope import check_scaling

            try:
                self.rope_scaling = check_scaling(rope_scaling, self.rotary_dim)
            except AttentionError as e:
                raise AttentionError(f"rope_scaling: {e}") from None
            self._rope = RotaryTable(self.rotary_dim, self.rope_theta, self.rope_scaling,
                                     dtype)
        elif rope_scaling:
            raise AttentionError("rope_scaling: given without rope_theta (no rotary "
                                 "embeddings); pass rope_theta too")
        self._init_weights(seed)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def mha(cls, hidden_size, num_heads, **kw):
        """Multi-head attention: one kv head per query head."""
        return cls(hidden_size, num_heads, num_heads, **kw)

    @classmethod
    def gqa(cls, hidden_size, num_heads, num_kv_heads, **kw):
        """Grouped-query attention: ``num_heads // num_kv_heads`` query heads per kv head."""
        return cls(hidden_size, num_heads, num_kv_heads, **kw)

    @classmethod
    def mqa(cls, hidden_size, num_heads, **kw):
        """Multi-query attention: one kv head shared by every query head."""
        return cls(hidden_size, num_heads, 1, **kw)

    @classmethod
    def from_hf_config(cls, config: Any, *, layer_idx: int = 0,
                       **kw: Any) -> "MultiHeadAttention":
        """Build from a Hugging Face config: a ``config.json`` dict or an object with
        ``to_dict()`` (``transformers.PretrainedConfig``).

        Reads hidden_size, num_attention_heads, num_key_value_heads, head_dim,
        attention_bias (Qwen2: q/k/v bias, no output bias), rope_theta / rope_parameters,
        rope_scaling (default, linear, llama3, dynamic, yarn, longrope; the lengths they
        need are taken from max_position_embeddings / original_max_position_embeddings),
        partial_rotary_factor, sliding_window (honouring use_sliding_window, layer_types
        and Gemma 2's every-other-layer rule for ``layer_idx``), attn_logit_softcapping,
        query_pre_attn_scalar (scale = its ** -0.5), rms_norm_eps; Qwen3 (model_type
        ``qwen3*``) turns on qk_norm; Phi (``phi``) has biases on q/k/v and ``dense``;
        BERT/RoBERTa become bidirectional layers with biases and no rotary (their absolute
        positions are added before attention). ``kw`` overrides (dtype, seed, ...).

        Parameters
        ----------
        config : dict or object with ``to_dict()``
        layer_idx : int, default 0
            Which layer (per-layer sliding windows).
        **kw
            Overrides of the constructor's arguments.

        Raises
        ------
        AttentionError (ValueError)
            A missing key, a value out of range (``num_key_value_heads: 0``), or a
            ``model_type`` this class does not represent faithfully (DeepSeek MLA, GPT-2,
            Gemma 3, unknown types): the message names it and what to use instead.
        TypeError
            ``config`` is not a dict / config object; a value of the wrong type (the
            message names the key).

        Examples
        --------
        >>> from numba_attn import MultiHeadAttention
        >>> cfg = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
        ...        "num_key_value_heads": 8, "rope_theta": 500000.0}
        >>> layer = MultiHeadAttention.from_hf_config(cfg, seed=0)
        >>> layer.num_kv_heads, layer.head_dim
        (8, 128)
        """
        hidden, h, args = hf_config.mha_args(config, layer_idx)
        args.update(kw)
        return cls(hidden, h, **args)

    def _init_weights(self, seed):
        rng = np.random.default_rng(seed)
        dt = self.dtype
        for name, attr, shape in self._param_specs():
            if attr in ("q_norm", "k_norm"):
                val = np.ones(shape, dt)
            elif attr.startswith("b_"):
                val = np.zeros(shape, dt)
            else:
                val = (rng.standard_normal(shape) / math.sqrt(shape[1])).astype(
                    self._dtype_of(2))
            setattr(self, attr, val)
        for attr in ("b_q", "b_k", "b_v", "b_o", "q_norm", "k_norm"):
            if not hasattr(self, attr):
                setattr(self, attr, None)

    def _param_specs(self):
        e, hd = self.hidden_size, self.head_dim
        nq, nkv = self.num_heads * hd, self.num_kv_heads * hd
        specs = [("q_proj.weight", "w_q", (nq, e)), ("k_proj.weight", "w_k", (nkv, e)),
                 ("v_proj.weight", "w_v", (nkv, e)), ("o_proj.weight", "w_o", (e, nq))]
        if self.qkv_bias:
            specs += [("q_proj.bias", "b_q", (nq,)), ("k_proj.bias", "b_k", (nkv,)),
                      ("v_proj.bias", "b_v", (nkv,))]
        if self.out_bias:
            specs.append(("o_proj.bias", "b_o", (e,)))
        if self.qk_norm:
            specs += [("q_norm.weight", "q_norm", (hd,)), ("k_norm.weight", "k_norm", (hd,))]
        return specs

    def _expand(self, name, value):
        if name in ("qkv_proj.weight", "qkv_proj.bias"):
            nq = self.num_heads * self.head_dim
            nkv = self.num_kv_heads * self.head_dim
            arr = to_numpy(name, value)
            if arr.ndim < 1 or arr.shape[0] != nq + 2 * nkv:
                raise AttentionError(f"merged projection must have {nq} + 2 * {nkv} = "
                                     f"{nq + 2 * nkv} rows, got shape {arr.shape}")
            kind = name.split(".")[1]
            return [(f"q_proj.{kind}", arr[:nq]), (f"k_proj.{kind}", arr[nq:nq + nkv]),
                    (f"v_proj.{kind}", arr[nq + nkv:])]
        return super()._expand(name, value)

    # -- properties ----------------------------------------------------------------------
    @property
    def is_mha(self):
        """One kv head per query head."""
        return self.config.is_mha

    @property
    def is_gqa(self):
        """Grouped-query attention: 1 < num_kv_heads < num_heads."""
        return self.config.is_gqa

    @property
    def is_mqa(self):
        """A single kv head shared by every query head."""
        return self.config.is_mqa

    def __repr__(self):
        return (f"MultiHeadAttention(hidden_size={self.hidden_size}, num_heads="
                f"{self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
                f", rope_theta={self.rope_theta}, dtype={self.dtype.name})")

    # -- forward -------------------------------------------------------------------------
    def __call__(self, x, **kw):
        return self.forward(x, **kw)

    def forward(self, x: Array, *, context: Array | None = None,
                positions: Array | None = None, cache: Any = None,
                kv_lens: Array | None = None, mask: Array | None = None,
                lora: dict | None = None, lora_scale: float = 1.0,
                backend: str | None = None, train: bool = False, dropout_p: float = 0.0,
                seed: int | None = None) -> Array:
        """Run the layer.

        Parameters
        ----------
        x : ndarray (batch, seqlen, hidden_size)
        context : ndarray (batch, seqlen_kv, hidden_size), optional
            Cross-attention: keys and values come from ``context``; no causal mask and no
            rotary.
        positions : int array (seqlen,) or (batch, seqlen), optional
            Rotary positions of the new tokens. Default: ``0 .. seqlen - 1``, or with a
            cache each row's current length onward.
        cache : KVCache or PagedKVCache, optional
            The new keys/values are appended, then the queries attend to the whole cache.
        kv_lens : int array (batch,), optional
            Key padding: row ``b`` sees only its first ``kv_lens[b]`` keys (no cache).
        mask : bool array broadcastable to (batch, num_heads, seqlen, seqlen_kv), optional
            True = may attend (combined with causal/window).
        lora : dict, optional
            ``{"q": (A, B), "k": ..., "v": ..., "o": ...}``, A ``(rank, in_features)``,
            B ``(out_features, rank)``; adds ``lora_scale * x @ A.T @ B.T`` to that
            projection.
        lora_scale : float, default 1.0
        backend : {"auto", "cpu", "cuda", "reference"}, default None
            None means the layer's own ``backend`` (the constructor's, "auto" by default);
            a name overrides it for this call. ``train=True`` runs on it as well.
        train : bool, default False
            Keep what :meth:`backward` needs (no cache); host arrays.
        dropout_p, seed : float, int, optional
            Attention dropout of a training step (``train=True`` only), as
            :func:`numba_attn.attention`.

        Returns
        -------
        y : ndarray (batch, seqlen, hidden_size), the layer dtype
            A torch tensor when ``x`` is one.

        Raises
        ------
        AttentionError (ValueError), TypeError
            Shapes, dtypes or options that do not fit (the message names the argument);
            the cache is left unchanged.
        BackendUnavailable
            ``backend="cuda"`` (or a device cache) without a usable GPU.

        Examples
        --------
        >>> import numpy as np, numba_attn
        >>> layer = numba_attn.MultiHeadAttention(32, 4, 2, rope_theta=1e4, seed=0)
        >>> x = np.random.default_rng(0).standard_normal((1, 5, 32), dtype=np.float32)
        >>> cache = numba_attn.KVCache(1, 16, num_kv_heads=2, head_dim=8)
        >>> steps = [layer(x[:, :3], cache=cache)] + [layer(x[:, t:t + 1], cache=cache)
        ...                                           for t in (3, 4)]   # prefill, decode
        >>> bool(np.allclose(np.concatenate(steps, 1), layer(x), atol=1e-5))
        True
        """
        if check_flag("train", train):
            from .mha_train import mha_forward_train

            return mha_forward_train(self, x, context=context, positions=positions,
                                     cache=cache, kv_lens=kv_lens, mask=mask, lora=lora,
                                     lora_scale=lora_scale, backend=backend,
                                     dropout_p=dropout_p, seed=seed)
        if dropout_p:
            raise AttentionError("dropout_p: only with train=True (inference has no dropout)")
        dt = self.dtype
        backend = self.backend if backend is None else backend
        x_ref, x = x, check_hidden("x", x, self.hidden_size, dt)
        bsz, sq, _ = x.shape
        src = x if context is None else check_hidden("context", context, self.hidden_size, dt)
        if src.shape[0] != bsz:
            raise AttentionError(f"context: batch {src.shape[0]} differs from x's {bsz}")
        if context is not None and cache is not None:
            raise AttentionError("context and cache: cross-attention with a cache is not "
                                 "supported; project the context once and pass it each call")
        if cache is not None and kv_lens is not None:
            raise AttentionError("kv_lens: not used with a cache (the cache knows each "
                                 "row's length)")
        e, hd, h, hkv = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        lo = check_lora(lora, {"q": (h * hd, e), "k": (hkv * hd, e), "v": (hkv * hd, e),
                               "o": (e, h * hd)}, dt)
        lora_scale = check_real("lora_scale", lora_scale)
        if positions is not None:
            positions = check_positions(positions, bsz, sq)
        q = linear(x, self.w_q, self.b_q, lo.get("q"), lora_scale).reshape(bsz, sq, h, hd)
        k = linear(src, self.w_k, self.b_k, lo.get("k"), lora_scale)
        v = linear(src, self.w_v, self.b_v, lo.get("v"), lora_scale)
        sk = src.shape[1]
        k = k.reshape(bsz, sk, hkv, hd)
        v = v.reshape(bsz, sk, hkv, hd)
        if self.qk_norm:
            from ..norm import rms_norm

            q = rms_norm(q, self.q_norm, eps=self.norm_eps)
            k = rms_norm(k, self.k_norm, eps=self.norm_eps)
        rot = self._rope is not None and context is None
        if cache is not None:
            o = self._attend_cache(q, k, v, cache, positions, rot, mask, backend)
        else:
            if rot:
                q, k, positions = self._rotate_qk(q, k, positions, bsz, sq)
            from ..functional import attention

            cfg = self.config
            qd, kd, vd = to_device_if(backend, q, k, v)
            o = attention(qd, kd, vd, causal=cfg.causal if context is None else False,
                          window=cfg.window if context is None else (-1, -1),
                          scale=cfg.scale, softcap=cfg.softcap, mask=mask,
                          kv_lens=kv_lens, backend=backend)
            o = to_host(o)
        o = o.reshape(bsz, sq, h * hd)
        return like(x_ref, linear(o, self.w_o, self.b_o, lo.get("o"), lora_scale))

    def backward(self, dy: Array):
        """Gradients of the last ``forward(..., train=True)`` call.

        Returns
        -------
        dx : ndarray (batch, seqlen, hidden_size)
        dcontext : ndarray, only after a cross-attention forward (then ``(dx, dcontext,
            grads)`` is returned)
        grads : dict
            Keyed like :meth:`state_dict` (``q_proj.weight``, ..., ``o_proj.bias``,
            ``q_norm.weight``, ``k_norm.weight``), plus ``lora.<target>.A`` /
            ``lora.<target>.B`` for each LoRA target the forward used.

        Examples
        --------
        >>> import numpy as np, numba_attn
        >>> layer = numba_attn.MultiHeadAttention(16, 4, 2, rope_theta=1e4, seed=0)
        >>> x = np.random.default_rng(0).standard_normal((1, 5, 16), dtype=np.float32)
        >>> y = layer.forward(x, train=True)
        >>> dx, grads = layer.backward(np.ones_like(y))
        >>> dx.shape, sorted(grads)[:2]
        ((1, 5, 16), ['k_proj.weight', 'o_proj.weight'])
        """
        from .mha_train import mha_backward

        return mha_backward(self, dy)

    def _rotate_qk(self, q, k, positions, bsz, sq):
        """q and k rotated by the layer's table at ``positions`` (0 .. sq - 1 in every row
        when None): (q, k, positions), for the inference and the training forward."""
        if positions is None:
            positions = np.broadcast_to(np.arange(sq, dtype=np.int64), (bsz, sq))
        return (self._rope.rotate(q, positions, self.rotary_interleaved),
                self._rope.rotate(k, positions, self.rotary_interleaved), positions)

    def _attend_cache(self, q, k, v, cache, positions, rot, mask, backend):
        """Append k/v to ``cache`` and attend; rotary inside the kernel call when the
        positions are the cache's own (the decode fast path: nothing grows with the cache)."""
        from ..kvcache import attention_with_kvcache

        cfg = self.config
        kw = dict(causal=cfg.causal, window=cfg.window, scale=cfg.scale,
                  softcap=cfg.softcap, backend=backend)
        if mask is not None:
            kw["mask"] = mask
        if rot and positions is not None:
            q = self._rope.rotate(q, positions, self.rotary_interleaved)
            k = self._rope.rotate(k, positions, self.rotary_interleaved)
        elif rot:
            cos, sin = self._rope.get(int(np.max(cache.seqlens, initial=0)) + q.shape[1])
            kw.update(rotary_cos=cos, rotary_sin=sin,
                      rotary_interleaved=self.rotary_interleaved)
        if getattr(cache, "device", "cpu") == "cuda":  # a device cache: activations follow
            require_cuda()
            q, k, v = to_device_if("cuda", q, k, v)
            if "rotary_cos" in kw:
                kw["rotary_cos"], kw["rotary_sin"] = self._rope.get_device()
        o = attention_with_kvcache(q, cache, k, v, **kw)
        return to_host(o)
