"""The vocabulary-sized tables under layer streaming: the token embedding and the LM head. On
Qwen2.5-Coder-1.5B each is 151936 x 1536, ~260 MiB packed (8-bit codes and per-group scales),
more than a budget of 300 MB holds for both; neither stays resident.

- Embedding lookups read only the rows of the step's tokens from the GGUF file (os.pread: nothing
  is mapped into the process) and pack just those rows with the function loading packs the whole
  table with. Every packed form is made row by row, so a row looked up here has the resident
  table's values.
- The LM head is packed once, in chunks of CHUNK_ROWS vocabulary rows, into the packed-layer file
  (offload/packed_layers.py), and the logits are computed chunk by chunk: a prefetch thread reads
  chunk c + 1 into one of two buffers while chunk c multiplies from the other, and each chunk's
  pages leave the page cache once read, as the layers' do. The kernels compute each output column
  from its own weight row alone, so the chunks' columns are the resident head's bit for bit
  (tests/model/test_layer_streaming.py compares the logits).

    hidden (N, d) ─┬─ chunk 0 (rows 0..4095)    ─→ logits[:, 0:4096]
                   ├─ chunk 1 (rows 4096..8191) ─→ logits[:, 4096:8192]     (read while 0 multiplies)
                   └─ ...
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from flashserve.model.loader.gguf import _FLOAT_TYPES
from flashserve.model.loader.gguf_file import GGUFTensorInfo
from flashserve.offload.packed_layers import PackedLayerStore, attach_entry, drop_tensors
from flashserve.quantization.gguf_blocks import GGUFTensor, release_mapped
from flashserve.quantization.gguf_method import pack_embedding, pack_linear
from flashserve.quantization.packed import DenseWeight, PackedWeight

CHUNK_ROWS = 4096  # head rows per chunk: Qwen2.5-Coder-1.5B's 8-bit rows, 6.75 MiB a chunk

EMBEDDING_NAME, HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"


def pack_rows(rows: np.ndarray, info: GGUFTensorInfo, as_embedding: bool, quantized: bool,
              dtype: torch.dtype) -> PackedWeight:
    """Rows of a GGUF table (as `info.data` holds them: (n, bytes per row) blocks or (n, K) floats)
    packed as loading packs the whole table (models/base.py): an embedding's quantized rows by
    pack_embedding, a head's by pack_linear, and float rows (or rows no kernel takes) in `dtype`."""
    n, k = rows.shape[0], int(info.shape[0])
    blocks = info.tensor_type not in _FLOAT_TYPES
    if quantized and blocks:
        part = GGUFTensor(rows, info.tensor_type, (n, k))
        packed = pack_embedding(part) if as_embedding else pack_linear([part], dtype)
        if packed is not None:
            return packed
    floats = GGUFTensor(rows, info.tensor_type, (n, k)).dequantize() if blocks else np.asarray(rows, np.float32)
    return DenseWeight(torch.from_numpy(floats).to(dtype))


def head_chunks(info: GGUFTensorInfo, as_embedding: bool, quantized: bool, dtype: torch.dtype
                ) -> Iterator[tuple[int, int, PackedWeight]]:
    """The head's table packed CHUNK_ROWS rows at a time, each chunk's file pages released once packed."""
    for start in range(0, info.data.shape[0], CHUNK_ROWS):
        end = min(start + CHUNK_ROWS, info.data.shape[0])
        rows = info.data[start:end]
        yield start, end, pack_rows(rows, info, as_embedding, quantized, dtype)
        release_mapped(rows)


class GGUFRows:
    """Rows of one GGUF tensor read with os.pread, their pages dropped from the page cache after."""

    def __init__(self, path: str, info: GGUFTensorInfo):
        self.path = path
        self.offset = info.data_offset
        self.row_shape, self.np_dtype = info.data.shape[1:], info.data.dtype  # no reference to the map
        self.row_bytes = info.data.strides[0]

    def read(self, ids: list[int]) -> np.ndarray:
        """Rows `ids` as (len(ids), *row shape), laid out as the tensor's memory map would give them."""
        out = np.empty((len(ids), *self.row_shape), self.np_dtype)
        flat, n = memoryview(out.reshape(-1).view(np.uint8)), self.row_bytes
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for j, row in enumerate(ids):
                at = self.offset + row * n
                if os.preadv(fd, [flat[j * n : (j + 1) * n]], at) != n:
                    raise OSError(f"{self.path} ends inside row {row} of the embedding")
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, at, n, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return out


class StreamedEmbedding(nn.Module):
    """forward(ids) looks rows up from the file; attend(hidden) is the tied head, when there is one."""

    def __init__(self, rows: GGUFRows, pack: Callable[[np.ndarray], PackedWeight], dtype: torch.dtype,
                 head: StreamedHead | None):
        super().__init__()
        self.rows, self.pack, self.dtype = rows, pack, dtype
        self.head = head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) → (T, d) in the compute dtype."""
        unique, inverse = torch.unique(input_ids, return_inverse=True)
        table = self.pack(self.rows.read(unique.tolist()))  # (U, d) packed
        return table.rows(inverse, self.dtype)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("this model's LM head is not tied to its embedding")
        return self.head(hidden)


class StreamedHead(nn.Module):
    """The LM head read chunk by chunk from the packed-layer file (module docstring)."""

    def __init__(self, store: PackedLayerStore):
        super().__init__()
        self.store, self.entries = store, store.head
        self.chunks = nn.ModuleList(store.head_modules)  # tensors empty between uses
        self.out_features = self.entries[-1]["rows"][1]
        largest = max(e["nbytes"] for e in self.entries)
        for b in range(2):  # counted among the model's resident buffers
            self.register_buffer(f"buffer{b}", torch.empty(largest, dtype=torch.uint8), persistent=False)
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="flashserve-head-prefetch")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) → (N, vocab) in hidden's dtype, as the resident head gives it."""
        buffers = (self.buffer0, self.buffer1)
        out = torch.empty(hidden.shape[0], self.out_features, dtype=hidden.dtype)  # (N, vocab)
        fd = os.open(self.store.dir / "layers.bin", os.O_RDONLY)
        pending = self.reader.submit(self.store.read_entry, fd, self.entries[0], buffers[0])
        try:
            for c, (entry, chunk) in enumerate(zip(self.entries, self.chunks)):
                pending.result()
                if c + 1 < len(self.entries):
                    pending = self.reader.submit(self.store.read_entry, fd, self.entries[c + 1], buffers[(c + 1) % 2])
                attach_entry(entry, dict(chunk.named_parameters()), buffers[c % 2])
                start, end = entry["rows"]
                out[:, start:end] = chunk(hidden)
                drop_tensors(chunk)
        finally:
            pending.result()  # no read may still be writing a buffer when the next call starts
            os.close(fd)
        return out
