"""Old home of the layers' projections and input checks, kept importable: they live in
numba_attn/layers/projections.py."""
from __future__ import annotations

from .layers.projections import (_LORA_TARGETS, GEMV_BF16_MAX_TOKENS,  # noqa: F401
                                 GEMV_MAX_TOKENS, _few_token_gemv, _put_linear, check_hidden,
                                 check_lora, check_positions, linear, linear_backward, widen)

__all__ = ["linear", "widen", "check_lora", "check_hidden", "check_positions"]
