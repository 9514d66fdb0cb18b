"""numba_attn: flash-style attention kernels in Numba, for numpy (CPU) and CUDA arrays."""
import os as _os

# OpenBLAS worker threads (numpy's, SciPy's) spin for ~0.1 s after every call, and a Numba
# kernel that follows a numpy matmul then shares the cores with them: attention right
# after a projection ran 1.3-1.8x slower (measured, 2 cores). A short spin avoids it where
# numba_attn is imported before numpy loads OpenBLAS (never overriding a value the user
# set); in every import order, _blas_quiet stops the workers before a parallel kernel.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from . import compat
from .cache import KVCache, PagedKVCache
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint
from .config import AttentionConfig, AttentionError, BackendUnavailable
from .dispatch import available_backends
from .backward import (attention_backward, attention_varlen_backward, attention_varlen_vjp,
                       attention_vjp)
from .functional import attention, attention_varlen, merge_states
from .kvcache import attention_with_kvcache
from .layers import MLACache, MultiHeadAttention, MultiHeadLatentAttention
from .mods import BlockMask, ModError, create_block_mask
from .norm import rms_norm, rms_norm_backward
from .rope import apply_rotary, apply_rotary_backward, rotary_cos_sin

from ._version import __version__

__all__ = [
    "AttentionConfig",
    "AttentionError",
    "BackendUnavailable",
    "ModError",
    "Checkpoint",
    "CheckpointError",
    "open_checkpoint",
    "attention",
    "attention_varlen",
    "attention_backward",
    "attention_varlen_backward",
    "attention_vjp",
    "attention_varlen_vjp",
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
    "apply_rotary_backward",
    "rms_norm_backward",
]
