"""numba_attn: flash-style attention kernels in Numba, for numpy (CPU) and CUDA arrays."""
import os as _os

# OpenBLAS worker threads (numpy's, SciPy's) spin for ~0.1 s after every call, and a Numba
# kernel that follows a numpy matmul then shares the cores with them: attention right
# after a projection ran 1.3-1.8x slower (measured, 2 cores). A short spin fixes it. This
# only takes effect if numba_attn is imported before numpy loads OpenBLAS, and never
# overrides a value the user set.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from . import compat
from .cache import KVCache, PagedKVCache
from .config import AttentionConfig, AttentionError, BackendUnavailable
from .dispatch import available_backends
from .functional import attention, attention_varlen, merge_states
from .kvcache import attention_with_kvcache
from .layers import MultiHeadAttention
from .mods import BlockMask, create_block_mask
from .mla import MLACache, MultiHeadLatentAttention
from .norm import rms_norm
from .rope import apply_rotary, rotary_cos_sin

from ._version import __version__

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
    "BlockMask",
    "create_block_mask",
    "apply_rotary",
    "rotary_cos_sin",
]
