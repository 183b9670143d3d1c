"""GGUFTensor.release_pages: a view of the model file's memory map leaves the resident set (the
kernel's own accounting in /proc/self/smaps) and reads back the same bytes; an array on the heap
(rows the loader permuted) is left alone, since MADV_DONTNEED would zero it."""
from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q

from flashserve.quantization.gguf_blocks import GGUFTensor

SIZE = 8 << 20


def resident_kib(view: np.ndarray) -> int:
    """Rss of the mapping that holds `view`'s first byte, from /proc/self/smaps."""
    addr = view.__array_interface__["data"][0]
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("no mapping holds the view")


def test_mapped_pages_leave_the_resident_set_and_read_back(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    rows = (SIZE - 4096) // 272
    view = mapped[4096 : 4096 + rows * 272].reshape(rows, 272)  # (rows, bytes per row) of 256 Q8_0 weights
    assert int(view.sum(dtype=np.int64)) == int(data[4096 : 4096 + rows * 272].sum(dtype=np.int64))  # read it all
    assert resident_kib(view) >= SIZE // 1024 - 8
    GGUFTensor(view, Q.Q8_0, (view.shape[0], 256)).release_pages()
    assert resident_kib(view) <= 8  # at most the first page, which the view does not cover wholly
    assert np.array_equal(view.reshape(-1), data[4096:4096 + view.size])  # faulted back from the file


def test_heap_arrays_are_left_alone():
    heap = np.arange(272 * 1000, dtype=np.uint8).reshape(1000, 272)
    GGUFTensor(heap, Q.Q8_0, (1000, 256)).release_pages()
    assert np.array_equal(heap.reshape(-1), np.arange(272 * 1000, dtype=np.uint8))


def test_packing_a_large_table_leaves_little_of_the_file_resident(tmp_path):
    """pack_embedding converts a table a chunk of rows at a time and releases what it read as it
    goes (from a little before each chunk: the kernel maps a file folio whole on a fault), so the
    file's pages do not stack on the packed copy; the codes and scales are the whole tensor's."""
    from flashserve.quantization.gguf_blocks import int8_groups
    from flashserve.quantization.gguf_method import pack_embedding

    rows, cols = 4096, 2048
    row_bytes = cols // 32 * 34
    blocks = np.random.default_rng(1).integers(0, 256, (rows, cols // 32, 34), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # finite scales d
    path = tmp_path / "table.bin"
    blocks.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r").reshape(rows, row_bytes)
    packed = pack_embedding(GGUFTensor(mapped, Q.Q8_0, (rows, cols)), own_kernels=True)
    assert resident_kib(mapped) <= (rows * row_bytes // 1024) // 8
    codes, scale = int8_groups(GGUFTensor(np.array(mapped), Q.Q8_0, (rows, cols)))
    assert np.array_equal(packed.codes.view(torch.int8).numpy(), codes)
    assert np.array_equal(packed.scale.float().numpy(), scale)
