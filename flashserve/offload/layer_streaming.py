"""Layer streaming (the AirLLM idea): run a model whose weights exceed max_weight_memory by keeping
only a window of decoder layers resident and reading the others, packed, from a file
(offload/packed_layers.py) while earlier layers compute.

The embedding and the LM head stream too (offload/vocab_streaming.py: rows looked up from the GGUF
file, the head read in chunks through two buffers); what stays resident is the norms, biases, rotary
tables and the head's two chunk buffers. What the budget leaves for layers, w = (budget - resident) // largest layer,
w layers' worth of buffers: the first w - 2 layers are read once and stay, the others pass through
two buffers (one when w = 1). Layer i computes from its buffer while a prefetch thread reads the next
streamed layer into the other; when i is done its buffer takes the layer after that (wrapping to the
first streamed layer: the next forward pass starts again at layer 0). One pass over the layers serves
the whole batch, so a step of 32 sequences reads the weights once, as a step of one does.

    w = 4, 8 layers: L0 L1 pinned; computing L3:   buffers [L3 computing] [L4 reading]
    L3 done:                                        buffers [L5 reading]   [L4 computing]

Resident memory is the resident part plus w buffers, whatever the model's size: the buffers are
allocated once and reused, reads bypass the process (os.preadv into them) and their pages are
dropped from the page cache (posix_fadvise DONTNEED) once read.
"""
from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from flashserve.heap import map_large_blocks, release_free_heap
from flashserve.offload.packed_layers import PackedLayerStore, drop_streamed, streamed_params
from flashserve.offload.vocab_streaming import (
    EMBEDDING_NAME,
    HEAD_NAME,
    GGUFRows,
    StreamedEmbedding,
    StreamedHead,
    head_chunks,
    pack_rows,
)

logger = logging.getLogger(__name__)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors outside the streamed ones (parameters and buffers)."""
    streamed = {id(p) for layer in model.model.layers for _, p in streamed_params(layer)}
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()) if id(t) not in streamed)


def window_for_budget(budget: int, resident: int, layer_bytes: list[int]) -> int:
    """Layers resident at once under `budget` bytes of weights; ValueError when not even one fits."""
    largest = max(layer_bytes)
    window = (budget - resident) // largest
    if window < 1:
        mib = 2**20
        raise ValueError(
            f"max_weight_memory={budget} bytes ({budget / mib:.1f} MiB) is smaller than the weights that stay "
            f"resident ({resident / mib:.1f} MiB: norms, biases, rotary tables, the LM head's chunk buffers) "
            f"plus one decoder layer ({largest / mib:.1f} MiB); give at least {resident + largest} bytes")
    return min(window, len(layer_bytes))


class LayerStreamer:
    """The first w - 2 layers are read once and stay (pinned: a ring wider than two buffers would
    only read every layer again each pass, measured no faster); the others pass through a ring of
    the remaining buffers (two, or one when w = 1). Hooks on those: before layer i, wait for its
    bytes and attach them; after it, detach them and read the layer `ring` places on into its buffer."""

    def __init__(self, layers: nn.ModuleList, store: PackedLayerStore, window: int):
        self.layers, self.store, self.window = layers, store, window
        self.fd = os.open(store.dir / "layers.bin", os.O_RDONLY)
        self.pinned = max(window - 2, 0)  # layers 0 .. pinned - 1, resident for good
        self.ring = window - self.pinned
        self.num_streamed = len(layers) - self.pinned
        self.pinned_buffers = []
        for i in range(self.pinned):
            buf = torch.empty(store.layer_bytes(i), dtype=torch.uint8)
            store.read(self.fd, i, buf)
            store.attach(i, layers[i], buf)
            self.pinned_buffers.append(buf)
        largest = max(store.layer_bytes(i) for i in range(self.pinned, len(layers)))
        self.buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(self.ring)]  # (bytes,) each
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="flashserve-layer-prefetch")
        self.buffer_of: dict[int, int] = {}  # layer → buffer it is (being) read into
        self.pending: dict[int, Future] = {}
        self.attached: int | None = None
        self._start(self.pinned)
        for i in range(self.pinned, len(layers)):
            layers[i].register_forward_pre_hook(lambda _m, _a, i=i: self._before(i))
            layers[i].register_forward_hook(lambda _m, _a, _o, i=i: self._after(i))

    def _later(self, i: int, k: int) -> int:
        """The streamed layer k places after layer i (wrapping to the first streamed layer)."""
        return self.pinned + (i - self.pinned + k) % self.num_streamed

    def _start(self, first: int) -> None:
        """(Re)fill the ring with the streamed layers from `first` on."""
        for f in self.pending.values():
            f.result()
        self.pending.clear()
        if self.attached is not None:
            drop_streamed(self.layers[self.attached])
            self.attached = None
        self.buffer_of = {self._later(first, k): k for k in range(self.ring)}
        for layer, b in self.buffer_of.items():
            self.pending[layer] = self.reader.submit(self.store.read, self.fd, layer, self.buffers[b])

    def _before(self, i: int) -> None:
        if i not in self.pending:  # a pass that did not end (an exception mid-forward): start over at i
            self._start(i)
        self.pending.pop(i).result()
        self.store.attach(i, self.layers[i], self.buffers[self.buffer_of[i]])
        self.attached = i

    def _after(self, i: int) -> None:
        drop_streamed(self.layers[i])
        self.attached = None
        nxt = self._later(i, self.ring)
        buffer = self.buffer_of.pop(i)  # free now: with a window of one, the next layer waits for this read
        self.buffer_of[nxt] = buffer
        self.pending[nxt] = self.reader.submit(self.store.read, self.fd, nxt, self.buffers[buffer])


def load_streamed(model: nn.Module, path: str, cfg, quantization: str, budget: int) -> LayerStreamer | None:
    """Fill `model` from the GGUF file at `path` one layer at a time (packing each and writing it, and
    the LM head in chunks, to the packed-layer store on the first run; reading only the norms and
    biases on later ones), put the streamed embedding and head (offload/vocab_streaming.py) in place of
    the resident ones, and start streaming. None when the budget holds every layer (then all are
    loaded and stay; the embedding and head still stream)."""
    from itertools import groupby

    from flashserve.kernels import ops
    from flashserve.model.loader.gguf import iter_gguf_tensors
    from flashserve.model.loader.gguf_file import open_gguf

    map_large_blocks()
    store = PackedLayerStore(path, quantization, model.dtype, ops.available())
    layers = model.model.layers
    keep = quantization != "none"
    tensors = {t.name: t for t in open_gguf(path).tensors}
    embedding = tensors["token_embd.weight"]
    head_info = embedding if model.lm_head is None else tensors["output.weight"]
    if store.complete:
        skip = lambda name: _is_streamed(name) or _is_vocab_table(name)  # noqa: E731
        model.load_weights(iter_gguf_tensors(path, cfg, keep, skip=skip), hf_checkpoint=False, complete=False)
    else:
        logger.info("writing the packed layers of %s to %s (once)", path, store.dir)
        for i, group in groupby(iter_gguf_tensors(path, cfg, keep, skip=_is_vocab_table),
                                key=lambda nt: _layer_of(nt[0])):
            model.load_weights(group, hf_checkpoint=False, complete=False)
            if i is not None:
                store.write_layer(i, layers[i], len(layers))
                release_free_heap()  # packing's small temporaries left the heap fragmented
        for start, end, chunk in head_chunks(head_info, model.lm_head is None, keep, model.dtype):
            store.write_head_chunk(start, end, chunk)
            release_free_heap()
        store.finish(layers)
    store.open(layers)
    head = StreamedHead(store)
    pack = functools.partial(pack_rows, info=embedding, as_embedding=True, quantized=keep, dtype=model.dtype)
    tied = model.lm_head is None
    model.model.embed_tokens = StreamedEmbedding(GGUFRows(path, embedding), pack, model.dtype, head if tied else None)
    if not tied:
        model.lm_head = head
    del tensors, embedding, head_info  # their views of the file's memory map
    release_free_heap()
    sizes = [store.layer_bytes(i) for i in range(len(layers))]
    window = window_for_budget(budget, resident_bytes(model), sizes)
    if window == len(layers):
        logger.info("max_weight_memory holds all %d layers: nothing streams", len(layers))
        fd = os.open(store.dir / "layers.bin", os.O_RDONLY)
        try:
            for i, layer in enumerate(layers):
                buf = torch.empty(sizes[i], dtype=torch.uint8)
                store.read(fd, i, buf)
                store.attach(i, layer, buf)
        finally:
            os.close(fd)
        return None
    logger.info("layer streaming: %d of %d layers resident (%.1f MiB each at most), %.1f MiB resident besides",
                window, len(layers), max(sizes) / 2**20, resident_bytes(model) / 2**20)
    return LayerStreamer(layers, store, window)


def _is_vocab_table(name: str) -> bool:
    """The embedding and the LM head: never loaded whole (offload/vocab_streaming.py)."""
    return name in (EMBEDDING_NAME, HEAD_NAME)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def _is_streamed(name: str) -> bool:
    """A decoder layer's projection weight (q/k/v/o, gate/up/down): the tensors the store holds."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")
