"""Bridges from other frameworks to numba_attn (each imports its framework lazily).

* :mod:`numba_attn.integrations.transformers` — ``attn_implementation="numba_attn"`` for
  Hugging Face transformers models (``pip install "numba_attn[hf]"``).
"""
