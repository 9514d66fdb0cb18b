"""The layers, as a small package (each module below the ones that use it, no cycle):

- ``projections``  ``linear`` (BLAS, few-token GEMV, bfloat16 weights, LoRA) and its
  backward, the layers' input checks
- ``params``       Hugging Face named parameters: ``state_dict`` / strict ``load_state_dict``
- ``rotary``       the cos/sin table a layer grows on demand (HF's per-call rope rules)
- ``device``       host activations to the device and back (``backend="cuda"``, device caches)
- ``hf_config``    ``config.json`` -> constructor arguments, the model types each layer takes
- ``mha``, ``mha_train``   :class:`~numba_attn.MultiHeadAttention`; its training forward and
  backward
- ``mla``, ``mla_train``   :class:`~numba_attn.MultiHeadLatentAttention` and ``MLACache``; its
  training forward and backward

Every name ``numba_attn.layers`` had as one module is re-exported here.
"""
from ..config import (AttentionConfig, AttentionError, BackendUnavailable,  # noqa: F401
                      check_flag, check_int, check_real)
from ..interop import Array, like, to_numpy  # noqa: F401
from .device import require_cuda, to_device_if, to_host  # noqa: F401
from .hf_config import _HF_LLAMA_LIKE, _HF_OTHER, _REQUIRED, hf_dict, hf_get, hf_rope  # noqa: F401
from .mha import MultiHeadAttention
from .mla import MLACache, MultiHeadLatentAttention
from .params import ParameterMixin, _as_mapping, _weight  # noqa: F401
from .projections import (_LORA_TARGETS, GEMV_MAX_TOKENS, check_hidden,  # noqa: F401
                          check_lora, check_positions, linear, widen)
from .rotary import RotaryTable  # noqa: F401

__all__ = ["MultiHeadAttention", "MultiHeadLatentAttention", "MLACache"]
