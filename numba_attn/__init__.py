"""numba_attn: flash-style attention kernels in Numba, for numpy (CPU) and CUDA arrays."""
from .config import AttentionConfig, AttentionError, BackendUnavailable
from .dispatch import available_backends
from .functional import attention, attention_varlen, merge_states

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "AttentionError",
    "BackendUnavailable",
    "attention",
    "attention_varlen",
    "available_backends",
    "merge_states",
]
