"""A file of the decoder layers' packed weights and of the LM head's, written once per model and read
one layer (or one chunk of the head's vocabulary rows) at a time by layer streaming
(offload/layer_streaming.py, offload/vocab_streaming.py).

Packing a GGUF layer into the kernels' layout costs far more than reading it: on Qwen2.5-Coder-1.5B
(Q4_K_M, 2 cores) 0.26-0.74 s a layer (0.74 where Q6_K tensors were requantized to 8 bits) against
9-31 ms to read its 26-33 MiB of packed bytes (page cache warm / cold), so streaming repacked
layers would cost seconds a step. The packed bytes are therefore written here on the first run and
read back as they are on every pass.

    <cache>/packed/<model stem>-<key>/
        layers.bin     layer 0's tensors | layer 1's | ... | head chunk 0's | ...   each entry page-aligned,
                       tensors 64-aligned
        index.json     per layer and per head chunk: start, bytes, and (parameter name, dtype, shape,
                       offset) of each tensor; a chunk also its vocabulary rows [start, end)
        skeleton.pt    per layer: each Linear's packed-weight module with empty tensors (its structure);
                       per head chunk: its packed-weight module, likewise

The key covers what decides the packing: the file (path, size, mtime), quantization, compute dtype,
and whether this project's C++ kernels built. A process writes the store into a directory of its own
and renames it into place when index.json (written last) is in, so a reader never sees a store that
another process is still writing; of two first starts writing at once, the first rename wins and the
other process reads the winner's store (the same bytes: packing is deterministic).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from flashserve.model.layers.linear import Linear

FORMAT_VERSION = 7  # 2: the LM head's chunks; 3: packed-weight classes in their own modules (the skeleton pickles their paths)
# 4: Q5_1, Q5_K, Q3_K, IQ4_NL and IQ4_XS in their exact 8-bit forms (quantization/gguf_int8_forms.py)
# 5: Q2_K, IQ3_*, IQ2_*, IQ1_*, TQ* packed (quantization/gguf_codebook_forms.py), no longer float
# 6: Q6_K linears in their exact form (groups of 16), no longer requantized to groups of 32
# 7: Q3_K as ±q in groups of 16 (its 3-bit codes), no longer its scale folded into 8-bit codes; a tiled
#    weight's tile_levels (4-bit indices into its codes' values)
_PAGE = 4096
_ALIGN = 64


def streamed_params(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that stream: those of the layer's Linear modules (packed or float), biases aside.
    Norms and biases stay resident: a few KiB a layer."""
    return [(f"{mname}.{pname}", p) for mname, m in layer.named_modules() if isinstance(m, Linear)
            for pname, p in m.named_parameters() if pname != "bias"]


def drop_streamed(layer: nn.Module) -> None:
    """Free the layer's streamed tensors (their modules stay, holding empty tensors)."""
    for _, p in streamed_params(layer):
        p.data = torch.empty(0, dtype=p.dtype)


class PackedLayerStore:
    def __init__(self, model_path: str, quantization: str, dtype: torch.dtype, own_kernels: bool):
        from flashserve.model.catalogue import cache_dir

        st = os.stat(model_path)
        key = json.dumps([FORMAT_VERSION, os.path.abspath(model_path), st.st_size, st.st_mtime_ns, quantization,
                          str(dtype), own_kernels])
        self.dir = cache_dir() / "packed" / f"{Path(model_path).stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
        self.index: list[dict] = []  # per layer
        self.head: list[dict] = []  # per chunk of the head's rows
        self.head_modules: list[nn.Module] = []  # per chunk: its packed module, tensors empty once written
        self._file = None
        self._writing = self.dir.with_name(f".{self.dir.name}.{os.getpid()}.tmp")  # this process's unfinished store

    @property
    def complete(self) -> bool:
        return (self.dir / "index.json").exists()

    # ---- writing (first run) -----------------------------------------------------------------
    def write_layer(self, i: int, layer: nn.Module, num_layers: int) -> None:
        """Append layer i's streamed tensors (in the file's order of layers: 0, 1, 10, 11, ... is
        common) and free them."""
        if not self.index:
            self.index = [None] * num_layers
        if self.index[i] is not None:
            raise ValueError(f"layer streaming needs a file that stores each layer's tensors together; "
                             f"layer {i}'s come in two runs")
        self.index[i] = self._append(streamed_params(layer))
        drop_streamed(layer)

    def write_head_chunk(self, start: int, end: int, module: nn.Module) -> None:
        """Append the packed module of the head's vocabulary rows [start, end) and free its tensors."""
        entry = self._append(list(module.named_parameters()))
        entry["rows"] = [start, end]
        self.head.append(entry)
        drop_tensors(module)
        self.head_modules.append(module)

    def _append(self, named: list[tuple[str, torch.Tensor]]) -> dict:
        """Write the tensors from the next page on; their index entry."""
        if self._file is None:
            self._remove_dead_writers()
            self._writing.mkdir(parents=True)
            self._file = open(self._writing / "layers.bin", "wb")
        f = self._file
        start = -(-f.tell() // _PAGE) * _PAGE
        f.seek(start)
        tensors = []
        for name, p in named:
            offset = -(-(f.tell() - start) // _ALIGN) * _ALIGN
            f.seek(start + offset)
            f.write(memoryview(p.data.contiguous().view(-1).view(torch.uint8).numpy()))
            tensors.append([name, str(p.dtype).removeprefix("torch."), list(p.shape), offset])
        return {"start": start, "nbytes": f.tell() - start, "tensors": tensors}

    def _remove_dead_writers(self) -> None:
        """Remove the unfinished copies of this store whose writing process is gone (killed during its
        first start), this pid's own included: each can hold most of a model's packed bytes."""
        for stale in self.dir.parent.glob(f".{self.dir.name}.*.tmp"):
            pid = stale.name[len(self.dir.name) + 2 : -len(".tmp")]
            if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)

    def finish(self, layers: nn.ModuleList) -> None:
        """Write the skeleton and then the index, which marks the store complete."""
        missing = [i for i, entry in enumerate(self.index) if entry is None]
        if missing or len(self.index) != len(layers):
            raise ValueError(f"the file lacks the tensors of layers {missing or list(range(len(layers)))}")
        self._file.close()
        self._file = None
        torch.save({"layers": _skeleton(layers), "head": self.head_modules}, self._writing / "skeleton.pt")
        (self._writing / "index.json").write_text(json.dumps({"layers": self.index, "head": self.head}))
        if self.dir.exists() and not self.complete:  # an unfinished store of an earlier layout
            shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.rename(self._writing, self.dir)
        except OSError:
            if not self.complete:
                raise
            shutil.rmtree(self._writing, ignore_errors=True)  # another start finished the same store first

    # ---- reading -----------------------------------------------------------------------------
    def open(self, layers: nn.ModuleList) -> None:
        """Read the index and give every Linear of `layers` its packed module, with empty tensors (and
        the head's chunks theirs, in head_modules)."""
        index = json.loads((self.dir / "index.json").read_text())
        self.index, self.head = index["layers"], index["head"]
        if len(self.index) != len(layers):
            raise ValueError(f"{self.dir} holds {len(self.index)} layers, the model has {len(layers)}")
        # Our own file, written above: it holds our packed-weight classes, so a full unpickle.
        skeleton = torch.load(self.dir / "skeleton.pt", weights_only=False)
        self.head_modules = skeleton["head"]
        for layer, linears in zip(layers, skeleton["layers"]):
            modules = dict(layer.named_modules())
            for name, qweight in linears.items():
                linear = modules[name]
                if qweight is not None:
                    linear.weight, linear.qweight = None, qweight
            drop_streamed(layer)

    def layer_bytes(self, i: int) -> int:
        return self.index[i]["nbytes"]

    def read(self, fd: int, i: int, into: torch.Tensor) -> None:
        """Layer i's bytes into the uint8 buffer `into` (read_entry)."""
        self.read_entry(fd, self.index[i], into)

    def read_entry(self, fd: int, entry: dict, into: torch.Tensor) -> None:
        """An entry's bytes into the uint8 buffer `into` (os.preadv: the GIL is released while it
        reads), then drop them from the page cache: the file's pages count against the machine's
        memory too, and an entry is read again only one pass later."""
        start, n = entry["start"], entry["nbytes"]
        view, done = memoryview(into.numpy())[:n], 0
        while done < n:
            got = os.preadv(fd, [view[done:]], start + done)
            if got == 0:
                raise OSError(f"{self.dir / 'layers.bin'} ends inside the entry at byte {start}")
            done += got
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)

    def attach(self, i: int, layer: nn.Module, buffer: torch.Tensor) -> None:
        """Point layer i's streamed parameters at their bytes in `buffer` (no copy)."""
        attach_entry(self.index[i], dict(streamed_params(layer)), buffer)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def attach_entry(entry: dict, params: dict[str, nn.Parameter], buffer: torch.Tensor) -> None:
    """Point the entry's parameters (by name) at their bytes in `buffer` (no copy)."""
    for name, dtype, shape, offset in entry["tensors"]:
        dt = getattr(torch, dtype)
        size = dt.itemsize * _numel(shape)
        params[name].data = buffer[offset : offset + size].view(dt).view(shape)


def drop_tensors(module: nn.Module) -> None:
    """Free every parameter of `module` (it stays, holding empty tensors)."""
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _skeleton(layers: nn.ModuleList) -> list[dict]:
    """Per layer: Linear name → its packed module (or None for a float weight), tensors already empty."""
    return [{name: m.qweight for name, m in layer.named_modules() if isinstance(m, Linear)} for layer in layers]
