"""llama.cpp's two importance-matrix files, read into and written from per-column weights (K,) float32,
the same values imatrix.py keeps: the mean squared input of each column of a weight.

Layouts as llama.cpp's tools/imatrix/imatrix.cpp writes them and tools/quantize reads them
(github.com/ggml-org/llama.cpp):

Legacy binary (`--output-format dat`), little-endian, no padding:
    int32 entries
    per entry: int32 name length, the name's bytes (no terminator), int32 ncall, int32 nval,
               nval float32 values = (sum of squared inputs / inputs summed) * ncall
    optional trailer: int32 chunk count, int32 dataset-name length, the dataset name's bytes
  ncall is the number of chunks (calibration sequences) the sums span, rounded up; llama-quantize
  divides the values by it again (and takes them as they are when it is 0). An expert tensor's nval is
  columns x experts under one ncall.

GGUF (`imatrix.gguf`): keys general.type = "imatrix", imatrix.datasets (array of strings),
imatrix.chunk_count and imatrix.chunk_size (uint32; llama-quantize refuses a file without these three);
per weight, F32 tensors
    <weight>.in_sum2   ne (columns, matrices)  sums of squared inputs
    <weight>.counts    ne (1, matrices)        inputs summed (tokens)
    <weight>.in_sum    ne (columns, matrices)  sums of inputs (newer files; not used to quantize)
  llama-quantize's weights are in_sum2 / counts per matrix, and 1 for a matrix whose count is 0.
  More than one matrix means a 3-D expert tensor: flashserve writes only 2-D weights, so it refuses.

Both quotients are taken in float32, as llama-quantize takes them, so a file read here weighs a
quantization exactly as llama-quantize's reading of it would.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from flashserve.errors import FlashserveError

GGUF_MAGIC = b"GGUF"
_SUM2, _COUNTS, _SUM = ".in_sum2", ".counts", ".in_sum"
_MAX_NAME = 1 << 12  # a tensor name is at most 64 bytes in ggml; anything longer is not this format


class ImatrixFormatError(FlashserveError):
    """The bytes are not a well-formed importance matrix of the format they claim."""


# --- legacy binary ---------------------------------------------------------------------------------

def read_dat(data: bytes) -> dict[str, np.ndarray]:
    """The per-column weights of a legacy llama.cpp .dat file's bytes."""
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ImatrixFormatError(f"truncated legacy .dat: {what} needs {n} bytes at offset {pos}, "
                                     f"the file has {len(data) - pos} left")
        pos += n
        return data[pos - n : pos]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    entries = int32("the entry count")
    if entries < 1:
        raise ImatrixFormatError(f"legacy .dat with {entries} entries")
    weights: dict[str, np.ndarray] = {}
    for i in range(entries):
        length = int32(f"entry {i}'s name length")
        if not 0 < length <= _MAX_NAME:
            raise ImatrixFormatError(f"entry {i} has a name of {length} bytes: not a legacy .dat imatrix")
        try:
            name = take(length, f"entry {i}'s name").decode()
        except UnicodeDecodeError:
            raise ImatrixFormatError(f"entry {i}'s name is not UTF-8: not a legacy .dat imatrix") from None
        ncall, nval = int32(f"{name}'s call count"), int32(f"{name}'s value count")
        if nval < 1 or ncall < 0:
            raise ImatrixFormatError(f"{name}: {nval} values over {ncall} calls")
        values = np.frombuffer(take(4 * nval, f"{name}'s {nval} values"), "<f4")
        weights[name] = values / np.float32(ncall) if ncall > 0 else values.copy()
    if pos < len(data):  # the trailer: chunk count, then the dataset's name
        int32("the chunk count")
        take(int32("the dataset name's length"), "the dataset name")
    if pos != len(data):
        raise ImatrixFormatError(f"{len(data) - pos} unexpected bytes after the legacy .dat trailer")
    return weights


def write_dat(path: Path, weights: dict[str, np.ndarray], tokens: int, chunk_size: int, dataset: str) -> None:
    """Entries in name order, as llama-imatrix stores them."""
    ncall = math.ceil(tokens / chunk_size)
    out = [struct.pack("<i", len(weights))]
    for name in sorted(weights):
        raw = name.encode()
        values = np.asarray(weights[name], np.float32)
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size),
                (values * np.float32(max(ncall, 1))).astype("<f4").tobytes()]
    raw = dataset.encode()
    out += [struct.pack("<ii", tokens // chunk_size, len(raw)), raw]
    path.write_bytes(b"".join(out))


# --- GGUF ------------------------------------------------------------------------------------------

def read_gguf(path: str) -> dict[str, np.ndarray]:
    """The per-column weights of an imatrix GGUF file (llama-imatrix's default output)."""
    from gguf import GGUFReader
    from gguf.constants import GGMLQuantizationType as Q

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError... on broken files
        raise ImatrixFormatError(f"unreadable GGUF ({type(exc).__name__}: {exc})") from None
    tensors = {t.name: t for t in reader.tensors}
    names = sorted(n[: -len(_SUM2)] for n in tensors if n.endswith(_SUM2))
    if not names:
        kind = reader.fields.get("general.type")
        what = f"general.type {kind.contents()!r}" if kind is not None else "no general.type"
        raise ImatrixFormatError(f"a GGUF file with no <weight>{_SUM2} tensors ({what}): a model, "
                                 "not an importance matrix")
    orphans = sorted(n for n in tensors if n.endswith(_COUNTS) and n[: -len(_COUNTS)] not in names)
    if orphans:
        raise ImatrixFormatError(f"{orphans[0]} has no {_SUM2} beside it")
    weights: dict[str, np.ndarray] = {}
    for name in names:
        sums, counts = tensors[name + _SUM2], tensors.get(name + _COUNTS)
        if counts is None:
            raise ImatrixFormatError(f"{name}{_SUM2} has no {_COUNTS} beside it")
        if sums.tensor_type != Q.F32 or counts.tensor_type != Q.F32:
            raise ImatrixFormatError(f"{name}: sums and counts must be F32, not "
                                     f"{sums.tensor_type.name} and {counts.tensor_type.name}")
        s = np.asarray(sums.data, np.float32).reshape(-1, int(sums.shape[0]))  # (matrices, columns)
        c = np.asarray(counts.data, np.float32).reshape(-1)  # (matrices,)
        if c.size != s.shape[0]:
            raise ImatrixFormatError(f"{name}: {c.size} counts for {s.shape[0]} matrices of sums")
        if c.size > 1:
            raise ImatrixFormatError(f"{name}: {c.size} expert matrices (a 3-D tensor); flashserve quantizes "
                                     "2-D weights only")
        count = np.float32(np.rint(c[0]))  # llama.cpp rounds the stored count to an integer
        weights[name] = s[0] / count if count > 0 else np.ones(s.shape[1], np.float32)
    return weights


def write_gguf(path: Path, weights: dict[str, np.ndarray], tokens: int, chunk_size: int, dataset: str) -> None:
    """Sums and counts in name order, with the metadata llama-quantize asks for."""
    from gguf import GGUFWriter, GGUFValueType

    if tokens < 1:
        raise FlashserveError("an imatrix GGUF needs the number of calibration tokens (its counts)")
    writer = GGUFWriter(str(path), "imatrix")
    writer.kv_data[0].pop("general.architecture")  # llama-imatrix writes none; the writer always adds one
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_key_value("imatrix.chunk_count", tokens // chunk_size, GGUFValueType.UINT32)
    writer.add_key_value("imatrix.chunk_size", chunk_size, GGUFValueType.UINT32)
    count = np.full((1, 1), tokens, np.float32)
    for name in sorted(weights):
        mean = np.asarray(weights[name], np.float64)
        writer.add_tensor(name + _SUM2, (mean * tokens).astype(np.float32)[None, :])  # ne (columns, 1)
        writer.add_tensor(name + _COUNTS, count)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
