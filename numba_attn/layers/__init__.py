"""The layers: :class:`~numba_attn.MultiHeadAttention` (MHA, GQA, MQA) and what it is built from."""
from .mha import *  # noqa: F401,F403
from .mha import (_HF_LLAMA_LIKE, _HF_OTHER, _LORA_TARGETS, _REQUIRED, GEMV_MAX_TOKENS,  # noqa: F401
                  MultiHeadAttention, ParameterMixin, RotaryTable, _as_mapping, _weight,
                  check_hidden, check_lora, check_positions, hf_dict, hf_get, hf_rope, linear,
                  require_cuda, to_device_if, to_host, widen)
