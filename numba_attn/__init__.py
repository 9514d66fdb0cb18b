"""numba_attn: flash-style attention kernels in Numba, for numpy (CPU) and CUDA arrays."""
from .cache import KVCache, PagedKVCache
from .config import AttentionConfig, AttentionError, BackendUnavailable
from .dispatch import available_backends
from .functional import attention, attention_varlen, merge_states
from .kvcache import attention_with_kvcache
from .layers import MultiHeadAttention
from .mla import MLACache, MultiHeadLatentAttention
from .norm import rms_norm
from .rope import apply_rotary, rotary_cos_sin

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "AttentionError",
    "BackendUnavailable",
    "attention",
    "attention_varlen",
    "available_backends",
    "merge_states",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "MLACache",
    "rms_norm",
    "KVCache",
    "PagedKVCache",
    "attention_with_kvcache",
    "apply_rotary",
    "rotary_cos_sin",
]
