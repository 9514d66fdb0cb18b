"""Reading safetensors checkpoints without torch: memory-mapped numpy arrays, bfloat16 too.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__":
{...}}``, offsets relative to the end of the header) and the raw little-endian tensor
bytes. :func:`open_checkpoint` parses the header itself and maps the data with ``mmap``,
so opening a 16 GB model reads a few kilobytes and a tensor is read from disk when its
pages are first touched. Sharded checkpoints (``model.safetensors.index.json`` and its
``weight_map``) look like one mapping of names to arrays.

numpy has no bfloat16: ``BF16`` tensors come out as ``ml_dtypes.bfloat16`` arrays (a
zero-copy view, needs the ``ml_dtypes`` package) or, with ``dtype=np.float32``, as float32
arrays widened by a 16-bit shift (exact, needs nothing beyond numpy). Layers load from a
checkpoint with ``layer.load_state_dict(ckpt, prefix="model.layers.0.self_attn.")``.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from .config import AttentionError

__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors reference implementation

# safetensors dtype code -> (numpy dtype string or ml_dtypes name, itemsize)
_NUMPY_CODES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                "U8": "u1", "BOOL": "?"}
_ML_DTYPES_CODES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ITEMSIZE = {**{c: np.dtype(s).itemsize for c, s in _NUMPY_CODES.items()},
             "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
SUPPORTED_DTYPES = tuple(_ITEMSIZE)


class CheckpointError(AttentionError):
    """A checkpoint that cannot be read as asked: bad file, missing shard or tensor,
    unsupported dtype, tensors of the wrong shape or dtype.

    Examples
    --------
    >>> import os, tempfile
    >>> from numba_attn import CheckpointError, open_checkpoint
    >>> try:
    ...     open_checkpoint(os.path.join(tempfile.mkdtemp(), "missing.safetensors"))
    ... except CheckpointError as e:
    ...     print("CheckpointError")
    CheckpointError
    """


def _ml_dtype(code):
    try:
        import ml_dtypes
    except ImportError:
        raise CheckpointError(
            f"{code} tensors need the ml_dtypes package (pip install ml_dtypes), or open "
            f"the checkpoint with dtype=np.float32 to widen them without it") from None
    return np.dtype(getattr(ml_dtypes, _ML_DTYPES_CODES[code]))


class TensorInfo:
    """Where one tensor lives: ``name``, ``dtype`` (safetensors code such as ``"BF16"``),
    ``shape`` (tuple), ``file`` (Path) and byte range ``start:end`` in the file."""

    __slots__ = ("dtype", "end", "file", "name", "shape", "start")

    def __init__(self, name, dtype, shape, file, start, end):
        self.name, self.dtype, self.shape = name, dtype, shape
        self.file, self.start, self.end = file, start, end

    def __repr__(self):
        return f"TensorInfo({self.name!r}, dtype={self.dtype!r}, shape={self.shape})"


class _File:
    """One safetensors file: its parsed header and its read-only memory map."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{self.path}: {size} bytes is too short for a "
                                          f"safetensors file (8-byte header length first)")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: header length {n} does not fit a file of {size} "
                        f"bytes; not a safetensors file, or truncated")
                raw = f.read(n)
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the header must be a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.tensors = {}
        for name, spec in header.items():
            self.tensors[name] = self._info(name, spec, data_size)

    def _info(self, name, spec, data_size):
        where = f"{self.path}: tensor {name!r}"
        try:
            code, shape, (b, e) = spec["dtype"], spec["shape"], spec["data_offsets"]
            shape = tuple(int(s) for s in shape)
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: expected {{'dtype', 'shape', 'data_offsets': "
                                  f"[begin, end]}}, got {spec!r}") from None
        if any(s < 0 for s in shape) or not 0 <= b <= e <= data_size:
            raise CheckpointError(f"{where}: shape {shape} / data_offsets [{b}, {e}] lie "
                                  f"outside the {data_size} data bytes")
        item = _ITEMSIZE.get(code)
        if item is not None and (e - b) != math.prod(shape) * item:
            raise CheckpointError(f"{where}: {e - b} bytes for shape {shape} of {code} "
                                  f"({math.prod(shape) * item} expected)")
        return TensorInfo(name, code, shape, self.path, self.data_start + b,
                          self.data_start + e)

    def read(self, info, dtype):
        code = info.dtype
        if code not in _ITEMSIZE:
            raise CheckpointError(
                f"{info.file}: tensor {info.name!r} has dtype {code!r}, which this reader "
                f"does not know; supported: {', '.join(SUPPORTED_DTYPES)}")
        count = math.prod(info.shape)
        if code == "BF16" and dtype is not None and np.dtype(dtype) in (np.float32,
                                                                          np.float64):
            bits = np.frombuffer(self.map, np.dtype("<u2"), count, info.start)
            wide = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
            return wide.reshape(info.shape).astype(dtype, copy=False)
        native = _ml_dtype(code) if code in _ML_DTYPES_CODES else np.dtype(_NUMPY_CODES[code])
        arr = np.frombuffer(self.map, native, count, info.start).reshape(info.shape)
        if not arr.flags.aligned:
            arr = arr.copy()  # an odd offset: a private, aligned copy
        if dtype is not None and code in FLOAT_CODES:
            return arr.astype(dtype, copy=False)
        return arr


class Checkpoint(Mapping):
    """The tensors of a safetensors checkpoint, one file or sharded, as a read-only mapping
    of names to numpy arrays.

    Arrays are read-only views of the memory-mapped files (copies only where a conversion
    was asked for or a tensor lies at an unaligned offset). Build one with
    :func:`open_checkpoint`.

    Parameters
    ----------
    files : list of path-like
        The safetensors files.
    weight_map : dict of str to path-like, optional
        Which file holds which tensor (a sharded index); default: every tensor of every file.
    dtype : numpy dtype, optional
        Floating tensors are converted to it when read (e.g. float32); default: as stored.

    Attributes
    ----------
    files : list of Path
    metadata : dict
        The ``__metadata__`` of the files (and the index's ``metadata``), merged.
    dtype : numpy dtype or None

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from numba_attn import Checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    >>> with open(path, "wb") as f:
    ...     _ = f.write(len(header).to_bytes(8, "little") + header
    ...                 + np.array([1.0, 2.0], "<f4").tobytes())
    >>> ckpt = Checkpoint([path])
    >>> list(ckpt), ckpt["w"]
    (['w'], array([1., 2.], dtype=float32))
    """

    def __init__(self, files, weight_map=None, dtype=None):
        self.dtype = None if dtype is None else np.dtype(dtype)
        if self.dtype is not None and self.dtype.kind != "f" and self.dtype.name != "bfloat16":
            raise TypeError(f"dtype: expected a floating dtype such as np.float32, got "
                            f"{self.dtype}")
        self._files = {}
        missing = [str(p) for p in files if not Path(p).is_file()]
        if missing:
            raise CheckpointError(f"missing shard file(s): {', '.join(missing)}")
        for p in files:
            self._files[Path(p)] = _File(p)
        self.files = list(self._files)
        self.metadata = {}
        for f in self._files.values():
            self.metadata.update(f.metadata)
        self._where = {}
        if weight_map is None:
            for f in self._files.values():
                for name, info in f.tensors.items():
                    self._where[name] = info
            return
        absent = []
        for name, file in weight_map.items():
            info = self._files[Path(file)].tensors.get(name)
            if info is None:
                absent.append(f"{name} (expected in {Path(file).name})")
            else:
                self._where[name] = info
        if absent:
            raise CheckpointError("the index names tensors its shards do not hold: "
                                  + ", ".join(absent))

    # -- Mapping -------------------------------------------------------------------------
    def __getitem__(self, name):
        return self.tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def __repr__(self):
        return (f"Checkpoint({len(self)} tensors in {len(self.files)} file(s), "
                f"dtype={None if self.dtype is None else self.dtype.name})")

    # -- reading -------------------------------------------------------------------------
    def info(self, name):
        """:class:`TensorInfo` (dtype code, shape, file) of a tensor, without reading it."""
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"{name!r}: no such tensor in the checkpoint "
                           f"({len(self)} tensors)") from None

    def tensor(self, name, dtype=None):
        """The tensor ``name`` as a numpy array.

        Parameters
        ----------
        name : str
        dtype : numpy dtype, optional
            Convert a floating tensor to this dtype; default the checkpoint's ``dtype``,
            else as stored (BF16 as ``ml_dtypes.bfloat16``). Integer tensors are never
            converted.

        Raises
        ------
        KeyError
            No such tensor.
        CheckpointError (ValueError)
            A dtype this reader does not know, or BF16 without ml_dtypes and no
            float32/float64 ``dtype``.
        """
        info = self.info(name)
        return self._files[info.file].read(info, self.dtype if dtype is None else dtype)

    def check(self, expected, prefix=""):
        """Check that tensors exist with the given shapes and a floating dtype.

        Parameters
        ----------
        expected : mapping of str to tuple
            ``{name: shape}``, names relative to ``prefix``.
        prefix : str, default ""

        Raises
        ------
        CheckpointError (ValueError)
            Listing every missing tensor, every tensor of another shape and every tensor
            that is not floating point (or of a dtype this reader does not know).
        """
        missing, misshaped, misdtyped = [], [], []
        for name, shape in expected.items():
            info = self._where.get(prefix + name)
            if info is None:
                missing.append(prefix + name)
                continue
            if info.shape != tuple(shape):
                misshaped.append(f"{info.name}: expected {tuple(shape)}, got {info.shape}")
            if info.dtype not in FLOAT_CODES:
                misdtyped.append(f"{info.name}: {info.dtype} (expected one of "
                                 f"{'/'.join(FLOAT_CODES)})")
        problems = [f"{title}: " + ", ".join(items) for title, items in
                    (("missing", missing), ("mis-shaped", misshaped),
                     ("wrong dtype", misdtyped)) if items]
        if problems:
            raise CheckpointError(f"checkpoint {self.files[0].parent}: " + "; ".join(problems))


def open_checkpoint(path: str | os.PathLike, *,
                    dtype: DTypeLike | None = None) -> Checkpoint:
    """Open a safetensors checkpoint (memory-mapped; nothing is read until used).

    Parameters
    ----------
    path : path-like
        A ``.safetensors`` file, a ``model.safetensors.index.json`` (sharded), or a
        directory holding one of them (the index wins; a directory with a single
        ``*.safetensors`` file and no index uses that file).
    dtype : numpy dtype, optional
        Convert floating tensors to this dtype when read (``np.float32`` widens bfloat16
        exactly, without ml_dtypes); default: as stored.

    Returns
    -------
    Checkpoint
        A read-only mapping ``{name: ndarray}``.

    Raises
    ------
    CheckpointError (ValueError)
        No checkpoint at ``path``, missing shards (all listed), an index naming tensors
        its shards lack, a malformed header.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from numba_attn import open_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> header = b'{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    >>> with open(path, "wb") as f:          # bfloat16 1.0 and -2.0
    ...     _ = f.write(len(header).to_bytes(8, "little") + header
    ...                 + np.array([0x3F80, 0xC000], "<u2").tobytes())
    >>> ckpt = open_checkpoint(path, dtype=np.float32)
    >>> ckpt["w"], ckpt.info("w").dtype
    (array([ 1., -2.], dtype=float32), 'BF16')
    """
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            p = p / INDEX_NAME
        elif (p / SINGLE_NAME).is_file():
            p = p / SINGLE_NAME
        else:
            found = sorted(p.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(
                    f"path: {p} holds neither {INDEX_NAME} nor {SINGLE_NAME}"
                    + (f", and {len(found)} other .safetensors files (which is the model?)"
                       if found else " (no .safetensors file at all)"))
            p = found[0]
    if not p.is_file():
        raise CheckpointError(f"path: {p} does not exist")
    if p.name.endswith(".json"):
        try:
            index = json.loads(p.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p}: not a safetensors index (a JSON object with a "
                                  f"'weight_map'): {e}") from None
        weight_map = {name: p.parent / file for name, file in weight_map.items()}
        files = sorted(set(weight_map.values()))
        ckpt = Checkpoint(files, weight_map, dtype)
        ckpt.metadata.update(index.get("metadata") or {})
        return ckpt
    return Checkpoint([p], None, dtype)
