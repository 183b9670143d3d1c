"""Open a GGUF file once, with clear errors for truncated, corrupted or non-GGUF files.

The header (key/value metadata, then one info record per tensor) is read here, straight from the
GGUF spec (ggml's docs/gguf.md); the `gguf` package supplies the type tables and the block
formats. Its own GGUFReader makes a numpy view per metadata element, which took 13 s for Gemma 3's
262,144-entry vocabulary (three arrays of that length) against 0.3 s here. Tensor data stays in
the memory map until read.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from flashserve.errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType) -> struct format of one scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: Any          # gguf.GGMLQuantizationType
    shape: tuple[int, ...]    # GGUF order: the innermost (contiguous) dimension first
    n_elements: int
    data_offset: int          # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray          # memory-mapped: float types as their numpy dtype, block types as
                              # uint8 (rows, bytes per row), both with the dimensions reversed


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]


class _Cursor:
    """Little-endian reads from the header bytes; running past the end means a truncated file."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise struct.error(f"a string of {n} bytes runs past the end of the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        itype, count = self.scalar("I"), self.scalar("Q")
        if itype in _SCALARS:  # numbers in one slice of the buffer
            dtype = np.dtype("<" + _SCALARS[itype]) if itype != 7 else np.dtype(np.bool_)
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise struct.error(f"an array of {count} values runs past the end of the file")
            values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos = end
            return values
        if itype == _STRING:
            return self.strings(count)
        return [self.value(itype) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        """`count` strings in one loop with no method call per element: a vocabulary and its merges are
        ~300k strings (0.6 s of Qwen2.5-Coder's start through string(), cProfile)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        length = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > end:
                raise struct.error(f"a string of {n} bytes runs past the end of the file")
            out.append(str(buf[pos:pos + n], "utf-8"))
            pos += n
        self.pos = pos
        return out


def _read(path: str) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    data = np.memmap(path, dtype=np.uint8, mode="r")
    # The header through a memoryview: a slice of the memmap itself is a new ndarray subclass
    # object, and a vocabulary is ~100k strings (0.5-0.9 s of SmolLM2's start-up, cProfile).
    cur = _Cursor(memoryview(data), path)
    cur.pos = 4  # magic, checked by the caller
    version = cur.scalar("I")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (only {SUPPORTED_VERSIONS}; "
                               "a big-endian file reads as a huge version)")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in metadata:
            raise ModelFormatError(f"{path}: metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("I")
        shape = tuple(cur.scalar("Q") for _ in range(n_dims))
        infos.append((name, shape, cur.scalar("I"), cur.scalar("Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: general.alignment {alignment} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment

    tensors, seen = [], set()
    for name, shape, raw_type, rel_offset in infos:
        if name in seen:
            raise ModelFormatError(f"{path}: tensor {name!r} appears twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelFormatError(f"{path}: tensor {name!r} has unknown GGML type {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(shape, dtype=np.int64))
        n_bytes = n_elems * type_size // block
        start = data_start + rel_offset
        if start + n_bytes > len(data):
            raise ModelFormatError(f"{path}: truncated GGUF file: tensor {name!r} ends at byte {start + n_bytes} "
                                   f"but the file has {len(data)} bytes")
        dims = tuple(reversed(shape))
        item = _ITEM_TYPES.get(qtype.name)
        if item is None:
            view = data[start:start + n_bytes].reshape(quant_shape_to_byte_shape(dims, qtype))
        else:
            view = data[start:start + n_bytes].view(item).reshape(dims)
        tensors.append(GGUFTensorInfo(name, qtype, shape, n_elems, start, n_bytes, view))
    return GGUFFile(path, version, metadata, tensors)


# Element types stored as plain numbers; every other GGML type is a block format read as bytes.
_ITEM_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}


@lru_cache(maxsize=4)
def open_gguf(path: str) -> GGUFFile:
    """The parsed header of `path` with memory-mapped tensor views, or ModelFormatError naming
    what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"model file not found: {path}")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return _read(str(p))
    except ModelFormatError:
        raise
    except Exception as exc:  # running past the end, bad UTF-8, unknown value types
        raise ModelFormatError(f"{path}: corrupted or truncated GGUF header ({type(exc).__name__}: {exc})") from None


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata as plain Python values (lists for arrays, str for strings)."""
    return open_gguf(str(path)).metadata
