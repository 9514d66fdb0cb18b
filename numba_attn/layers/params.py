"""Hugging Face named parameters of the layers: :class:`ParameterMixin` (``named_parameters``,
``state_dict``, a strict ``load_state_dict`` that stages and casts every entry before
assigning any) and the weight conversion it uses.
"""
from __future__ import annotations

import numpy as np

from .. import dispatch as dp
from ..config import AttentionError

__all__ = ["ParameterMixin"]


class ParameterMixin:
    """Hugging Face named parameters: subclasses define ``_param_specs()`` as a list of
    ``(hf_name, attribute, shape)`` and ``_aliases`` mapping extra names onto them."""

    _aliases: dict = {}

    def _param_specs(self):
        raise NotImplementedError

    def named_parameters(self, prefix=""):
        """``(name, array)`` pairs under Hugging Face names, e.g. ``q_proj.weight``.

        The arrays are the layer's own (edits change the layer)."""
        for name, attr, _ in self._param_specs():
            yield prefix + name, getattr(self, attr)

    def state_dict(self, prefix=""):
        """A dict ``{prefix + hf_name: array copy}``; :meth:`load_state_dict` reads it back."""
        return {name: np.array(a) for name, a in self.named_parameters(prefix)}

    def _expand(self, name, value):
        """One incoming entry -> list of (hf_name, array); merged entries are split here."""
        return [(self._aliases.get(name, name), value)]

    def load_state_dict(self, params, prefix=""):
        """Load Hugging Face-named arrays, strictly.

        Parameters
        ----------
        params : mapping of str to array
            Keys outside ``prefix`` are ignored (so a whole model's state dict, or a
            :class:`numba_attn.Checkpoint`, can be given with
            ``prefix="model.layers.0.self_attn."``); only values under ``prefix`` are read.
        prefix : str, default ""

        Raises
        ------
        AttentionError (ValueError)
            Listing every missing, unexpected, duplicated, mis-shaped and non-floating entry
            at once; the layer is left unchanged when any entry is wrong.
        """
        specs = {name: (attr, shape) for name, attr, shape in self._param_specs()}
        staged, unexpected, misshaped, duplicate, seen = {}, [], [], [], set()
        misdtyped = []
        params = _as_mapping(params)
        for key in params:  # values read only under prefix (a lazy checkpoint stays lazy)
            if not isinstance(key, str):
                raise TypeError(f"params: keys must be str names like 'q_proj.weight', got "
                                f"{key!r}")
            if not key.startswith(prefix):
                continue
            value = params[key]
            local = key[len(prefix):]
            try:
                parts = self._expand(local, value)
            except AttentionError as e:
                misshaped.append(f"{key}: {e}")
                continue
            for name, arr in parts:
                if name not in specs:
                    unexpected.append(key)
                    continue
                seen.add(name)
                src = getattr(arr, "dtype", None)
                if src is not None and not isinstance(arr, np.ndarray):
                    src = dp.as_np_dtype(src)
                if src is not None and np.dtype(src).kind != "f" and str(src) != "bfloat16":
                    misdtyped.append(f"{prefix}{name}: expected a floating dtype, got {src}")
                    continue
                try:  # every conversion happens here, before the first assignment
                    arr = _weight(f"{prefix}{name}", arr,
                                  self._dtype_of(np.ndim(arr)))
                except (TypeError, AttentionError) as e:
                    misshaped.append(str(e))
                    continue
                want = specs[name][1]
                if arr.shape != want:
                    misshaped.append(f"{prefix}{name}: expected {want}, got {arr.shape}")
                elif name in staged:
                    duplicate.append(f"{prefix}{name} (given twice, e.g. by an alias)")
                else:
                    staged[name] = arr
        missing = [prefix + n for n in specs if n not in seen]
        problems = []
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped), ("wrong dtype", misdtyped),
                             ("duplicated", duplicate)):
            if items:
                problems.append(f"{title}: " + ", ".join(items))
        if problems:
            raise AttentionError(f"load_state_dict({type(self).__name__}): nothing loaded; "
                                 + "; ".join(problems))
        for name, arr in staged.items():
            setattr(self, specs[name][0], arr)

    def _dtype_of(self, ndim):
        """Matrices are kept in ``weight_dtype`` (where a layer has one), the rest in
        ``dtype``."""
        return getattr(self, "weight_dtype", self.dtype) if ndim == 2 else self.dtype


def _as_mapping(params):
    """A mapping as it is (its values are read lazily), or a dict of (name, value) pairs."""
    if hasattr(params, "keys") and hasattr(params, "__getitem__"):
        return params
    try:
        return dict(params)
    except (TypeError, ValueError):
        raise TypeError(f"params: expected a mapping of names to arrays (or (name, array) "
                        f"pairs), got {type(params).__name__}") from None


def _weight(name, value, dtype):
    """A C-contiguous copy of ``value`` in ``dtype``: real and finite, else an error."""
    a = dp.host_operand(name, value, "fiu", "a real (float or int) array")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.array(a, dtype=dtype)
    if out.size and not np.isfinite(out).all():
        raise AttentionError(f"{name}: non-finite values (after the cast to {dtype})")
    return out
