"""Decoder-only language models (Llama, Mistral, Qwen2, Qwen3, Gemma-2) in numpy + numba_attn.

The building blocks a decoder needs beyond attention (token embeddings, RMSNorm, the gated
MLP, the lm head, Gemma-2's softcaps and sandwich norms) live here, in the example, so
that numba_attn stays an attention library. Attention is one
:class:`numba_attn.MultiHeadAttention` per layer, built by ``from_hf_config`` (GQA, q/k/v
bias, QK-norm, rotary scaling, sliding windows, logit softcap, query_pre_attn_scalar) and
loaded from the checkpoint with ``load_state_dict(ckpt, prefix=...)``; generation keeps
one :class:`numba_attn.PagedKVCache` per layer, one cache row per prompt.

Weights: float32 (or float64) compute; the matrices may stay in bfloat16
(``weight_dtype=ml_dtypes.bfloat16``, what :meth:`Decoder.from_pretrained` picks for a
bfloat16 checkpoint). That is half the memory of float32 (a Llama-3.2-1B: 2.3 GiB instead
of 4.6 GiB); a decode step reads 2 bytes per weight, widened to float32 in registers by
numba_attn's GEMV, and a prefill widens one matrix at a time for BLAS (a temporary of the
largest matrix: 128 MiB for that model's fused gate/up projection). KV caches are in the
compute dtype.

Usage::

    model = Decoder.from_pretrained("path/to/Llama-3.2-1B")
    ids = model.generate([[128000, 791, 6864]], max_new_tokens=20)[0]
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy.special import expit

from numba_attn import CheckpointError, MultiHeadAttention, PagedKVCache, open_checkpoint, rms_norm
from numba_attn.layers import linear, widen

SUPPORTED_MODEL_TYPES = ("gemma2", "llama", "mistral", "qwen2", "qwen3")
_TIED_BY_DEFAULT = {"gemma2": True}  # HF configs: the others default to an own lm_head


def gelu_tanh(x):
    """GELU, tanh approximation (``gelu_pytorch_tanh``, Gemma-2)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    """``x * sigmoid(x)`` (Llama, Mistral, Qwen); scipy's expit never overflows."""
    return x * expit(x)


_ACTIVATIONS = {"silu": silu, "swish": silu, "gelu_pytorch_tanh": gelu_tanh,
                "gelu_new": gelu_tanh, "gelu_tanh": gelu_tanh}


def layer_types(config):
    """``"sliding_attention"`` / ``"full_attention"`` per layer, as Hugging Face decides it:
    ``layer_types`` when given; Gemma-2 slides on even layers; Mistral on every layer when
    it has a window; Qwen2/3 on layers ``>= max_window_layers`` with
    ``use_sliding_window``; Llama never."""
    n = int(config["num_hidden_layers"])
    if config.get("layer_types") is not None:
        return list(config["layer_types"])
    mt, window = config["model_type"], config.get("sliding_window")
    if mt == "gemma2":
        slide = [i % 2 == 0 for i in range(n)]
    elif mt == "mistral":
        slide = [window is not None] * n
    elif mt in ("qwen2", "qwen3"):
        first = int(config.get("max_window_layers", 0))
        slide = [bool(config.get("use_sliding_window")) and window is not None and i >= first
                 for i in range(n)]
    else:
        slide = [False] * n
    return ["sliding_attention" if s else "full_attention" for s in slide]


def check_config(config):
    """Raise ValueError naming the supported families for an unsupported ``model_type``."""
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {mt!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: activation {act!r} is not supported; supported: "
                         f"{', '.join(sorted(_ACTIVATIONS))}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"config.json: missing keys {missing}")


class Block:
    """One decoder layer: attention and gated MLP, each pre-normed; Gemma-2 also post-norms
    both outputs ("sandwich") before the residual add.

    ``w`` holds the model's loaded arrays; this layer's are picked out once, here.
    """

    def __init__(self, attn, w, prefix, act, eps, sandwich):
        self.attn, self.act, self.eps, self.sandwich = attn, act, eps, sandwich
        p = prefix
        self.norm_attn_in = w[p + "input_layernorm.weight"]
        if sandwich:
            self.norm_attn_out = w[p + "post_attention_layernorm.weight"]
            self.norm_mlp_in = w[p + "pre_feedforward_layernorm.weight"]
            self.norm_mlp_out = w[p + "post_feedforward_layernorm.weight"]
        else:
            self.norm_mlp_in = w[p + "post_attention_layernorm.weight"]
        self.gate_up, self.gate_up_bias = w[p + "mlp.gate_up"], w.get(p + "mlp.gate_up_bias")
        self.down, self.down_bias = w[p + "mlp.down_proj.weight"], w.get(p + "mlp.down_proj.bias")

    def __call__(self, x, cache=None):
        h = self.attn(rms_norm(x, self.norm_attn_in, eps=self.eps), cache=cache)
        if self.sandwich:
            h = rms_norm(h, self.norm_attn_out, eps=self.eps)
        x = x + h
        gu = linear(rms_norm(x, self.norm_mlp_in, eps=self.eps), self.gate_up, self.gate_up_bias)
        inter = gu.shape[-1] // 2
        h = linear(self.act(gu[..., :inter]) * gu[..., inter:], self.down, self.down_bias)
        if self.sandwich:
            h = rms_norm(h, self.norm_mlp_out, eps=self.eps)
        return x + h


KV_CACHE_DTYPES = ("float32", "float64", "bfloat16", "float16", "int8", "float8_e4m3fn",
                   "float8_e5m2")


def resolve_kv_cache_dtype(kv_cache_dtype, dtype):
    """The KV caches' storage dtype: ``dtype`` (None), or a name of KV_CACHE_DTYPES / a
    numpy dtype that the compute dtype ``dtype`` may attend over."""
    if kv_cache_dtype is None:
        return np.dtype(dtype)
    name = kv_cache_dtype if isinstance(kv_cache_dtype, str) else np.dtype(kv_cache_dtype).name
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError(f"kv_cache_dtype: {name} needs ml_dtypes (pip install "
                             "ml_dtypes)") from None
        cdt = np.dtype(getattr(ml_dtypes, name))
    else:
        cdt = np.dtype(name)
    if cdt != np.dtype(dtype) and not (np.dtype(dtype) == np.float32 and cdt.itemsize < 4):
        raise ValueError(f"kv_cache_dtype: {name} caches with {np.dtype(dtype)} compute; "
                         f"use {np.dtype(dtype)} or (float32 compute) a 1- or 2-byte dtype")
    return cdt


class Decoder:
    """A decoder-only language model from a Hugging Face config and safetensors weights.

    Parameters
    ----------
    config : dict
        ``config.json``; ``model_type`` one of :data:`SUPPORTED_MODEL_TYPES`.
    ckpt : numba_attn.Checkpoint
        Opened with ``dtype=`` the ``weight_dtype`` (or natively for bfloat16).
    dtype : numpy dtype, default float32
        Compute dtype (float32 or float64) of activations, norms and KV caches.
    weight_dtype : numpy dtype, default dtype
        ``dtype``, or ``ml_dtypes.bfloat16`` with float32 compute: matrices (embeddings,
        projections, lm head) stay in bfloat16.
    kv_cache_dtype : numpy dtype or name, default dtype
        Storage of the KV caches: ``dtype``, or with float32 compute "float16",
        "bfloat16" (converted in registers) or "int8", "float8_e4m3fn", "float8_e5m2"
        (8-bit values with a float32 scale per token and kv head, quantized on append;
        bfloat16 and float8 need ml_dtypes). See :data:`KV_CACHE_DTYPES`.
    backend : str, default "auto"
        numba_attn backend of the attention calls.

    Raises
    ------
    ValueError
        An unsupported ``model_type``; a :class:`numba_attn.CheckpointError` listing
        every missing, mis-shaped or non-floating tensor.
    """

    def __init__(self, config, ckpt, *, dtype=np.float32, weight_dtype=None, backend="auto",
                 kv_cache_dtype=None):
        check_config(config)
        self.config = c = dict(config)
        self.dtype = np.dtype(dtype)
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)
        self.weight_dtype = self.dtype if weight_dtype is None else np.dtype(weight_dtype)
        mt = c["model_type"]
        self.gemma = mt == "gemma2"
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.act = _ACTIVATIONS[c.get("hidden_activation") or c.get("hidden_act") or "silu"]
        self.hidden = e = int(c["hidden_size"])
        self.vocab = v = int(c["vocab_size"])
        inter, n_layers = int(c["intermediate_size"]), int(c["num_hidden_layers"])
        self.tied = bool(c.get("tie_word_embeddings", _TIED_BY_DEFAULT.get(mt, False)))
        self.final_softcap = float(c.get("final_logit_softcapping") or 0.0)
        self.embed_scale = self.dtype.type(math.sqrt(e)) if self.gemma else None
        mlp_bias = bool(c.get("mlp_bias", False))
        cfg = dict(c, layer_types=layer_types(c))
        attns = [MultiHeadAttention.from_hf_config(
            cfg, layer_idx=i, dtype=self.dtype, weight_dtype=self.weight_dtype,
            backend=backend) for i in range(n_layers)]
        expected = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
        if not self.tied:
            expected["lm_head.weight"] = (v, e)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.gemma:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for i, attn in enumerate(attns):
            p = f"model.layers.{i}."
            expected.update({f"{p}{n}.weight": (e,) for n in norms})
            mlp = {"gate_proj": (inter, e), "up_proj": (inter, e), "down_proj": (e, inter)}
            for n, shape in mlp.items():
                expected[f"{p}mlp.{n}.weight"] = shape
                if mlp_bias:
                    expected[f"{p}mlp.{n}.bias"] = shape[:1]
            for n, arr in attn.named_parameters(p + "self_attn."):
                expected[n] = arr.shape
        ckpt.check(expected)  # every problem at once, before anything is loaded
        self.w = w = {}
        off = 1.0 if self.gemma else 0.0  # Gemma's RMSNorm scales by (1 + weight)
        for name, shape in expected.items():
            if "self_attn." in name or ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
                continue  # attention: loaded by the layers; gate/up: fused below
            if name.endswith("norm.weight"):
                w[name] = ckpt.tensor(name).astype(self.dtype) + self.dtype.type(off)
            elif len(shape) == 1:
                w[name] = ckpt.tensor(name).astype(self.dtype)
            else:
                w[name] = self._matrix(ckpt.tensor(name))
        for i in range(n_layers):
            p = f"model.layers.{i}.mlp."
            w[p + "gate_up"] = self._matrix(np.concatenate(
                [ckpt.tensor(p + "gate_proj.weight"), ckpt.tensor(p + "up_proj.weight")]))
            if mlp_bias:
                w[p + "gate_up_bias"] = np.concatenate(
                    [ckpt.tensor(p + "gate_proj.bias"),
                     ckpt.tensor(p + "up_proj.bias")]).astype(self.dtype)
        self.lm_head = w["model.embed_tokens.weight" if self.tied else "lm_head.weight"]
        for i, attn in enumerate(attns):
            attn.load_state_dict(ckpt, prefix=f"model.layers.{i}.self_attn.")
        self.layers = [Block(attn, w, f"model.layers.{i}.", self.act, self.eps, self.gemma)
                       for i, attn in enumerate(attns)]

    def _matrix(self, a):
        """A private, C-contiguous copy in ``weight_dtype`` (not a view of the file)."""
        return np.array(a, dtype=self.weight_dtype, order="C")

    @classmethod
    def from_pretrained(cls, model_dir, *, dtype=np.float32, weight_dtype="auto",
                        backend="auto", kv_cache_dtype=None):
        """Load ``config.json`` and the safetensors weights of a model directory.

        ``weight_dtype="auto"`` keeps bfloat16 matrices in bfloat16 (with float32 compute
        and ml_dtypes installed) and widens everything else to ``dtype``.
        """
        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise CheckpointError(f"model_dir: {d} has no config.json")
        config = json.loads((d / "config.json").read_text())
        check_config(config)
        if weight_dtype == "auto":
            weight_dtype = np.dtype(dtype)
            probe = open_checkpoint(d)
            bf16 = any(probe.info(n).dtype == "BF16" for n in probe)
            if bf16 and np.dtype(dtype) == np.float32:
                try:
                    import ml_dtypes

                    weight_dtype = np.dtype(ml_dtypes.bfloat16)
                except ImportError:
                    pass
        weight_dtype = np.dtype(weight_dtype)
        native = weight_dtype.name == "bfloat16"
        ckpt = open_checkpoint(d, dtype=None if native else weight_dtype)
        return cls(config, ckpt, dtype=dtype, weight_dtype=weight_dtype, backend=backend,
                   kv_cache_dtype=kv_cache_dtype)

    # -- the model ----------------------------------------------------------------------
    def embed(self, ids):
        """ids (batch, seq) -> hidden states (batch, seq, hidden) in the compute dtype."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"ids: token ids must lie in [0, {self.vocab}), got "
                             f"[{ids.min()}, {ids.max()}]")
        x = widen(self.w["model.embed_tokens.weight"][ids], self.dtype) \
            if self.weight_dtype != self.dtype else self.w["model.embed_tokens.weight"][ids]
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if self.embed_scale is not None:
            x *= self.embed_scale
        return x

    def head(self, h):
        """Final norm + lm head (+ Gemma-2's final softcap): (..., hidden) -> (..., vocab)."""
        h = rms_norm(np.ascontiguousarray(h), self.w["model.norm.weight"], eps=self.eps)
        logits = linear(h, self.lm_head)
        if self.final_softcap:
            c = self.final_softcap
            logits = c * np.tanh(logits / c)
        return logits

    def forward(self, ids):
        """Logits (batch, seq, vocab) of a whole sequence, no cache (causal attention)."""
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    # -- generation with paged caches ----------------------------------------------------
    def new_caches(self, batch, max_seqlen, block_size=16):
        """One PagedKVCache per layer with room for ``batch`` rows of ``max_seqlen``."""
        blocks = batch * -(-max_seqlen // block_size)
        return [PagedKVCache(batch, blocks, block_size, layer.attn.num_kv_heads,
                             layer.attn.head_dim, dtype=self.kv_cache_dtype,
                             max_seqlen=max_seqlen)
                for layer in self.layers]

    def prefill(self, prompts, caches):
        """Run ragged prompts through the model into empty caches; next-token logits
        (batch, vocab).

        The prompts are right-padded to the longest one and appended to every row in one
        call per layer; causal attention keeps each real token from seeing the padding
        after it, and setting each cache's ``seqlens`` to the true lengths then releases
        the padding (its pages go back to the pool), so every row continues at its own
        length.
        """
        lens = np.array([len(p) for p in prompts], np.int64)
        if len(lens) == 0 or lens.min() < 1:
            raise ValueError("prompts: need at least one prompt, each of at least 1 token")
        ids = np.zeros((len(prompts), int(lens.max())), np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        x = self.embed(ids)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache=cache)
        for cache in caches:
            cache.seqlens = lens
        return self.head(x[np.arange(len(prompts)), lens - 1])

    def decode_step(self, tokens, caches):
        """One new token per row (int array (batch,)) -> next-token logits (batch, vocab)."""
        x = self.embed(np.asarray(tokens).reshape(-1, 1))
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache=cache)
        return self.head(x[:, 0])

    def generate(self, prompts, max_new_tokens, *, sampler=None, eos_token_ids=(),
                 block_size=16, on_step=None):
        """Generate for a ragged batch of prompts in one set of paged caches.

        Parameters
        ----------
        prompts : list of list of int
        max_new_tokens : int
        sampler : callable (row, logits (vocab,)) -> int, optional
            Default greedy (argmax).
        eos_token_ids : iterable of int
            A row stops after generating one of these (it is kept in the output).
        on_step : callable (new_tokens: list of int or None per row), optional
            Called after every step (None for rows that have stopped).

        Returns
        -------
        list of list of int
            The generated ids of each prompt.
        """
        eos = {int(t) for t in eos_token_ids}
        sampler = sampler or (lambda row, logits: int(np.argmax(logits)))
        batch = len(prompts)
        caches = self.new_caches(batch, max(len(p) for p in prompts) + max_new_tokens,
                                 block_size)
        out = [[] for _ in range(batch)]
        done = [max_new_tokens <= 0] * batch
        if all(done):
            return out
        logits = self.prefill(prompts, caches)
        for step in range(max_new_tokens):
            new = [None] * batch
            for b in range(batch):
                if not done[b]:
                    new[b] = sampler(b, logits[b])
                    out[b].append(new[b])
                    done[b] = new[b] in eos or len(out[b]) >= max_new_tokens
            if on_step is not None:
                on_step(new)
            if all(done):
                break
            logits = self.decode_step([0 if t is None else t for t in new], caches)
        return out


def make_sampler(temperature=1.0, top_k=0, top_p=1.0, seed=None):
    """A sampler (row, logits) -> token: softmax at ``temperature``, then the ``top_k``
    most likely tokens (0 = all), then the smallest set whose probability reaches
    ``top_p`` (Hugging Face's order). Row ``b`` draws from its own generator seeded with
    ``(seed, b)``, so a prompt's tokens do not depend on the rest of its batch."""
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0 (use greedy decoding), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0, got {top_k}")
    rngs = {}

    def sample(row, logits):
        rng = rngs.setdefault(row, np.random.default_rng(
            None if seed is None else (int(seed), row)))
        z = np.asarray(logits, np.float64) / temperature
        order = np.argsort(-z, kind="stable")
        if top_k:
            order = order[:top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1  # first index reaching top_p
        p = p[:keep] / p[:keep].sum()
        return int(order[rng.choice(len(p), p=p)])

    return sample
