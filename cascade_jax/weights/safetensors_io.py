"""Streaming safetensors reading and writing (no torch, bfloat16 included).

The reader memory-maps the file and hands out one tensor at a time, so converting a
checkpoint needs memory for the output only. The writer writes tensor by tensor into a
temporary file and renames it into place, so a failed export never leaves a partial file.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from cascade_jax import storage
from cascade_jax.storage import atomic

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message names the file and the problem."""


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


def pickle_kind(path: Path, head: bytes) -> str | None:
    """What kind of PyTorch pickle ``path`` is (by its first bytes or name), or None."""
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (torch.save)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (legacy torch.save)"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"a {path.suffix} file (PyTorch pickle)"
    return None


def pickle_message(path: Path, kind: str) -> str:
    return (f"{path} is {kind}, not safetensors. Pickles are never loaded here (unpickling can run arbitrary "
            "code). Re-save it as safetensors with your own PyTorch, e.g. python -c \"import torch; from "
            "safetensors.torch import save_file; sd = torch.load('IN', weights_only=True); "
            "save_file(sd.get('state_dict', sd), 'OUT.safetensors')\"")


class SafetensorsReader:
    """``reader.keys()``, ``reader.shape(key)``, ``reader.dtype(key)``, ``reader.get(key)`` (a read-only view).

    The header is validated as the format requires before any tensor is read: a JSON object of
    objects, each with a known dtype, a shape of non-negative integers and ``data_offsets`` that
    are in order, contiguous and non-overlapping, cover the data section exactly and match
    dtype x shape. A malformed header is one :class:`SafetensorsError` naming the file and tensor.
    """

    def __init__(self, path):
        self.path = storage.local_copy(path)  # a URL is read from a local copy (memory-mapped), fetched once
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            kind = pickle_kind(self.path, head)
            if kind is not None:
                raise SafetensorsError(pickle_message(self.path, kind))
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{self.path}: header length {n} does not fit the {size}-byte file "
                                       "(truncated download, or not a safetensors file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({type(e).__name__}: {e}); "
                                       "not a safetensors file") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is a JSON {type(header).__name__}, not an object; "
                                   "not a safetensors file")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise SafetensorsError(f"{self.path}: __metadata__ must map strings to strings")
        self._data_start = 8 + n
        self._entries = header
        self._check_entries(size - self._data_start)
        self._raw = None
        if size > 0:
            with open(self.path, "rb") as f:
                self._raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _bad(self, key, problem):
        return SafetensorsError(f"{self.path}: tensor {key!r}: {problem} (a damaged or hand-edited file; "
                                "download or export it again)")

    def _check_entry(self, key, entry) -> tuple[int, int]:
        if not isinstance(entry, dict):
            raise self._bad(key, f"entry is {entry!r}, not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise self._bad(key, f"shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise self._bad(key, f"data_offsets {offsets!r} is not a pair of non-negative integers")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SafetensorsError(f"{self.path}: tensor {key!r} of shape {shape} {dtype} needs "
                                   f"{expected} bytes but its offsets span {end - begin}")
        return begin, end

    def _check_entries(self, data_size: int):
        spans = sorted((*self._check_entry(key, entry), key) for key, entry in self._entries.items())
        position = 0
        for begin, end, key in spans:
            if begin != position:
                problem = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
                raise self._bad(key, f"data_offsets [{begin}, {end}] {problem}")
            position = end
        if position > data_size:
            key = spans[-1][2]
            raise SafetensorsError(f"{self.path}: tensor {key!r} ends at byte {position} of the data section but the "
                                   f"file holds only {data_size} data bytes (truncated file; download it again)")
        if position != data_size:
            raise SafetensorsError(f"{self.path}: {data_size - position} bytes after the last tensor belong to no "
                                   "tensor (a damaged file; download or export it again)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key) -> tuple:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key) -> np.dtype:
        return DTYPES[self._entries[key]["dtype"]]

    def get(self, key) -> np.ndarray:
        """A read-only view of the tensor in the memory-mapped file (no copy)."""
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        data = np.frombuffer(self._raw, np.uint8, end - begin, self._data_start + begin) if end > begin else \
            np.zeros(0, np.uint8)
        return data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def release(self, key):
        """Drop the tensor's pages from memory once it has been copied (they would count as resident)."""
        begin, end = self._entries[key]["data_offsets"]
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin and hasattr(mmap, "MADV_DONTNEED"):
            self._raw.madvise(mmap.MADV_DONTNEED, start, self._data_start + end - start)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def save_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Write a dict of numpy arrays (atomic)."""
    specs = [(k, np.asarray(v).dtype, np.shape(v)) for k, v in tensors.items()]
    write_safetensors(path, specs, lambda key: np.asarray(tensors[key]), metadata)


def write_safetensors(path, specs, fetch, metadata: dict | None = None):
    """Stream tensors into a safetensors file: ``specs`` lists ``(key, dtype, shape)`` and
    ``fetch(key)`` produces each array only when it is written. Atomic: temp file, then rename."""
    entries, offset = [], 0
    for key, dtype, shape in specs:
        dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{key}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        entries.append((key, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    header = {k: {"dtype": DTYPE_NAMES[d], "shape": list(s), "data_offsets": [b, e]} for k, d, s, b, e in entries}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    if storage.is_url(path):  # streamed into one object, which appears only when complete
        with atomic.sigterm_as_exception(), storage.open_write(path) as f:
            _write_body(f, blob, entries, fetch)
        return
    path = Path(path).resolve()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name the .safetensors file to write")
    with atomic.replacing(path, fsync=True) as tmp, open(tmp, "wb") as f:
        _write_body(f, blob, entries, fetch)


def _write_body(f, blob: bytes, entries, fetch):
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key, dtype, shape, _, _ in entries:
        arr = np.asarray(fetch(key), order="C")
        if arr.dtype != dtype or tuple(arr.shape) != shape:
            raise ValueError(f"{key}: produced {arr.dtype}{arr.shape}, announced {dtype}{shape}")
        f.write(arr.tobytes())
