"""Old home of :class:`~numba_attn.MultiHeadLatentAttention` and :class:`~numba_attn.MLACache`,
kept importable: they live in numba_attn/layers/mla.py."""
from __future__ import annotations

from .layers.mla import MLACache, MultiHeadLatentAttention, _is_yarn, yarn_mscale  # noqa: F401

__all__ = ["MultiHeadLatentAttention", "MLACache"]
