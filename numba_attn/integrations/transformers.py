"""A Hugging Face transformers attention backend: ``attn_implementation="numba_attn"``.

>>> from numba_attn.integrations import transformers as nt   # doctest: +SKIP
>>> nt.register()                                            # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="numba_attn")  # doctest: +SKIP

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface``
and Hugging Face's SDPA mask builder (``masking_utils.sdpa_mask``) to its
``AttentionMaskInterface`` under the same name, so a model hands this backend what it
hands SDPA: no mask for plain causal (or full) attention, else a boolean
(batch, 1 or heads, q_len, kv_len) mask that already holds causality, the sliding window,
padding and packed-sequence boundaries. What the backend serves:

* causal / bidirectional attention, cross attention, GQA/MQA (kv heads never repeated);
* ``scaling``, ``softcap`` (Gemma-2), ``sliding_window`` (Mistral, Qwen2, Gemma-2),
  ``s_aux`` / ``sinks`` (GPT-OSS attention sinks);
* boolean masks (``mask=``) and additive float masks or ``position_bias`` (``bias=``);
* HF's KV caches (``generate``): the cache's (batch, kv_heads, seq, dim) tensors are read
  in place, without a copy, by treating each kv head as a batch row;
* training: tensors that require grad go through numba_attn's torch autograd
  (``numba_attn.autograd``), dropout included (seed drawn from torch's generator).

Rows that see no key at all (the query rows of left padding) come out 0, where eager gives
the mean of all values; such rows are padding and never reach a real token.

What it cannot serve raises :class:`UnsupportedFeature` (a ``ValueError``) naming the
feature: ``output_attentions=True`` (the fused kernels never form the probabilities),
flex-attention ``BlockMask`` masks, and models whose attention layers do not call
``ALL_ATTENTION_FUNCTIONS`` (transformers would silently run their own attention: see
:func:`check`). transformers offers no hook that runs at load for a registered backend,
so :func:`check` (model or config) is the load-time check; the rest is raised at the first
call.

torch and transformers are imported only when these functions run.
"""
from __future__ import annotations

import sys

from ..config import AttentionError

__all__ = ["NAME", "UnsupportedFeature", "register", "attention_forward", "check",
           "unsupported_reasons"]

NAME = "numba_attn"


class UnsupportedFeature(AttentionError):
    """A model or call asks for something the numba_attn backend cannot compute."""


def register(name: str = NAME, *, threading_layer: str | None = "workqueue") -> str:
    """Register the backend with transformers under ``name`` (default ``"numba_attn"``).

    Idempotent. Returns ``name``, ready for ``attn_implementation=``.

    Parameters
    ----------
    name : str, default "numba_attn"
    threading_layer : str or None, default "workqueue"
        Numba's threading layer, set only when Numba has not started its threads yet and
        ``NUMBA_THREADING_LAYER`` is unset. Numba's OpenMP layer in a process whose torch
        runs OpenMP too made a 4k decode step 15x slower (30 ms instead of 2 ms per layer,
        2 cores, measured here); the workqueue layer does not share torch's threads
        (numba_attn serialises its parallel calls on it). ``None`` leaves Numba alone.

    Raises
    ------
    ImportError
        transformers (or torch) is not installed: ``pip install "numba_attn[hf]"``.

    Examples
    --------
    >>> from numba_attn.integrations import transformers as nt   # doctest: +SKIP
    >>> nt.register()                                            # doctest: +SKIP
    'numba_attn'
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("numba_attn.integrations.transformers needs transformers and torch: "
                          'pip install "numba_attn[hf]"') from e
    if threading_layer is not None:
        _choose_threading_layer(threading_layer)
    AttentionInterface.register(name, attention_forward)
    # the same masks as SDPA: None for plain causal/full attention, else boolean, True = attend
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _choose_threading_layer(layer):
    import os

    import numba
    from numba.np.ufunc import parallel

    if os.environ.get("NUMBA_THREADING_LAYER") or getattr(parallel, "_is_initialized", True):
        return  # the user chose, or Numba's threads already run (the layer is fixed)
    numba.config.THREADING_LAYER = layer


def unsupported_reasons(model_or_config) -> list[str]:
    """Why this backend cannot serve ``model_or_config`` (an empty list when it can).

    Checks what is known before the first call: attention layers that bypass
    ``ALL_ATTENTION_FUNCTIONS`` and ``output_attentions`` set in the config.
    """
    reasons = []
    config = getattr(model_or_config, "config", model_or_config)
    cls = type(model_or_config)
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        reasons.append(f"{cls.__name__}: its attention layers do not call transformers' "
                       "ALL_ATTENTION_FUNCTIONS, so no registered backend can replace them")
    for sub in _configs(config):
        if getattr(sub, "output_attentions", False):
            reasons.append("output_attentions=True: the fused kernels never form the attention "
                           "probabilities; use attn_implementation='eager' for them")
            break
    return reasons


def check(model_or_config):
    """Raise :class:`UnsupportedFeature` listing :func:`unsupported_reasons`; return the
    argument otherwise (``model = check(AutoModelForCausalLM.from_pretrained(...))``)."""
    reasons = unsupported_reasons(model_or_config)
    if reasons:
        raise UnsupportedFeature("numba_attn backend cannot serve this model: "
                                 + "; ".join(reasons))
    return model_or_config


def _configs(config):
    yield config
    for name in ("text_config", "vision_config", "audio_config", "decoder", "encoder"):
        sub = getattr(config, name, None)
        if sub is not None and sub is not config and hasattr(sub, "to_dict"):
            yield sub


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, is_causal: bool | None = None,
                      s_aux=None, position_bias=None, **kwargs):
    """transformers' attention-function signature over numba_attn.attention.

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (``is_causal`` is read from it when not passed).
    query : tensor (batch, num_heads, q_len, head_dim)
    key : tensor (batch, num_kv_heads, kv_len, head_dim)
    value : tensor (batch, num_kv_heads, kv_len, head_dim_v)
    attention_mask : tensor (batch or 1, 1 or num_heads, q_len, kv_len) or None
        Boolean (True = attend; from the SDPA mask builder :func:`register` installs) or
        additive float. With a mask, causality and windows come from the mask alone, as in
        eager/SDPA. ``None``: SDPA's ``is_causal`` rule (causal with query ``i`` at key
        position ``i``, i.e. top-left, when ``q_len > 1``; a single query sees every key).
    dropout : float, default 0.0
        Attention dropout (only when the module trains); seed drawn from torch's generator.
    scaling : float, default 1 / sqrt(head_dim)
    sliding_window : int, optional
        Key ``j`` is seen by query ``i`` when ``i - j < sliding_window`` (HF's rule); used
        only when there is no mask (a mask already holds it).
    softcap : float, optional
        Scores become ``softcap * tanh(s / softcap)`` after scaling.
    is_causal : bool, optional
    s_aux : tensor (num_heads,), optional
        Attention-sink logits (also accepted as ``sinks=``).
    position_bias : float tensor broadcastable to (batch, num_heads, q_len, kv_len), optional
        Added to the scores (T5-style relative bias); causality as without it.

    Returns
    -------
    out : tensor (batch, q_len, num_heads, head_dim_v), query's dtype
    weights : None

    Raises
    ------
    UnsupportedFeature
        ``output_attentions=True`` or a flex-attention ``BlockMask``.
    """
    torch = sys.modules["torch"]
    from .. import functional

    if kwargs.get("output_attentions", False):
        raise UnsupportedFeature("output_attentions=True: the numba_attn backend never forms the "
                                 "attention probabilities; use attn_implementation='eager' to "
                                 "get them")
    sinks = s_aux if s_aux is not None else kwargs.get("sinks")
    bsz, h, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[3]
    if key.shape[0] != bsz or value.shape[:3] != key.shape[:3] or h % max(hkv, 1):
        raise AttentionError(f"query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                             f"{tuple(value.shape)}: expected (batch, heads, seq, dim) tensors "
                             "with num_heads a multiple of num_kv_heads")
    mask = bias = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise UnsupportedFeature(f"attention_mask of type {type(attention_mask).__name__} "
                                     "(a flex-attention BlockMask?): the numba_attn backend takes "
                                     "boolean or additive float tensors")
        m = attention_mask[..., :sk] if attention_mask.shape[-1] > sk else attention_mask
        if m.dtype == torch.bool:
            mask = m
        else:
            bias = m.to(query.dtype)
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    masked = attention_mask is not None  # a mask holds causality and windows itself
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    opts = dict(scale=scaling, softcap=float(softcap or 0.0))
    windowed = not masked and sliding_window is not None and int(sliding_window) > 0
    if windowed:
        w = int(sliding_window) - 1
        opts["window"] = (w, 0 if causal else w)
    if not masked and causal and sq > 1:
        opts["causal"] = True
    if (windowed or opts.get("causal")) and sq > 1:
        # SDPA's is_causal: top-left, query i at key position i (HF relies on it, e.g. for a
        # static cache's prefill whose later slots are still empty); one query: the last key
        opts["q_offset"] = 0
    if dropout and getattr(module, "training", True):
        opts.update(dropout_p=float(dropout),
                    seed=int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item()))
    # zero copies where possible: HF's own projections give BSHD-contiguous k/v (transposed
    # views); a KV cache gives BHSD-contiguous ones, read as (batch * kv_heads) rows of one
    # kv head each (sinks are per query head, so they need the plain form)
    kt, vt = key.transpose(1, 2), value.transpose(1, 2)
    if sinks is not None or (kt.is_contiguous() and vt.is_contiguous()):
        out = functional.attention(query.transpose(1, 2), kt, vt, mask=mask, bias=bias,
                                   sinks=sinks, **opts)
        return out, None
    g = h // hkv
    q_r = query.reshape(bsz * hkv, g, sq, d).transpose(1, 2)
    k_r = key.reshape(bsz * hkv, sk, 1, d)
    v_r = value.reshape(bsz * hkv, sk, 1, dv)
    out = functional.attention(q_r, k_r, v_r, mask=_per_kv_head(mask, bsz, h, hkv),
                               bias=_per_kv_head(bias, bsz, h, hkv), **opts)
    out = out.reshape(bsz, hkv, sq, g, dv).permute(0, 2, 1, 3, 4).reshape(bsz, sq, h, dv)
    return out, None


def _per_kv_head(m, bsz, h, hkv):
    """A (b, 1 or h, sq, sk) mask/bias as (b * hkv, 1 or h // hkv, sq, sk) rows."""
    if m is None:
        return None
    while m.dim() < 4:
        m = m.unsqueeze(0)
    _, mh, mq, mk = m.shape  # seqlen dims may stay broadcast (1)
    m = m.expand(bsz, mh, mq, mk)
    if mh == 1:
        return m.unsqueeze(1).expand(bsz, hkv, 1, mq, mk).reshape(bsz * hkv, 1, mq, mk)
    return m.reshape(bsz * hkv, h // hkv, mq, mk)
