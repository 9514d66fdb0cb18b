"""Old home of the backward passes of the building blocks and of the layers, kept importable.

:func:`rms_norm_backward` and :func:`apply_rotary_backward` live in norm.py and rope.py
beside their forwards, :func:`linear_backward` in layers/projections.py beside ``linear``,
and each layer's training forward and backward in the layers package beside the layer
(layers/mha_train.py, layers/mla_train.py); all are re-exported here.
"""
from __future__ import annotations

from .layers.mha_train import mha_backward, mha_forward_train  # noqa: F401
from .layers.mla_train import mla_backward, mla_forward_train  # noqa: F401
from .layers.projections import _put_linear, linear_backward  # noqa: F401
from .norm import rms_norm_backward  # noqa: F401
from .rope import apply_rotary_backward  # noqa: F401

__all__ = ["apply_rotary_backward", "linear_backward", "rms_norm_backward"]
