"""`flashserve quantize --method gguf`: a GGUF file or a Hugging Face directory → a GGUF file of another
type, written with gguf-py.

A GGUF source's key/value metadata (architecture, hyper-parameters, tokenizer, chat template) is copied
as it is, except the file type, which names the new one; an HF directory's is made from its config and
tokenizer (gguf_source.py). Each tensor is read as float32 and:

    1-D (norms, biases)                         → F32, as llama.cpp keeps them
    the LM head (output, or token_embd if tied)  → --output-type (llama.cpp's default: Q6_K)
    every other 2-D weight (the linears, an untied token_embd) → --type
    a K-quant asked for on rows not a multiple of 256 → llama.cpp's fallback (gguf_encode.fitted_type)

With an importance matrix (imatrix.py) each weight's fit is weighted by its columns' importance
(gguf_encode.py). Tensors keep a GGUF source's names, layouts and order, so Q/K rows stay permuted
as llama.cpp expects. The file is written under a temporary name and renamed at the end.
"""
from __future__ import annotations

import os
import resource
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType
from gguf.constants import GGMLQuantizationType as Q

from flashserve.errors import FlashserveError, ModelFormatError
from flashserve.quantization.gguf_encode import TYPES, encode, fitted_type

_EMBEDDING, _HEAD = "token_embd.weight", "output.weight"
_FILE_TYPES = {Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_S, Q.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
               Q.Q6_K: LlamaFileType.MOSTLY_Q6_K, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0,
               Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
               Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: LlamaFileType.MOSTLY_Q5_1}


@dataclass(frozen=True)
class GGUFQuantizeArgs:
    model: str  # a .gguf file, a catalogue name, or a Hugging Face directory (gguf_source.py)
    out: str
    qtype: str = "Q4_K"
    output_type: str = "Q6_K"
    imatrix: str | None = None


def quantize_gguf(args: GGUFQuantizeArgs, progress=None) -> dict:
    """Writes args.out; returns {"types": Counter of tensor types written, "notes": [...], "peak_rss_mib"}."""
    from flashserve.model.catalogue import resolve
    from flashserve.quantization.gguf_source import open_source
    from flashserve.quantization.imatrix import load_imatrix

    qtype, head_type = _type(args.qtype, "--type"), _type(args.output_type, "--output-type")
    out = Path(args.out)
    if out.exists():
        raise FlashserveError(f"{out} exists; choose a new output path")
    src = Path(resolve(args.model))
    source = open_source(src)
    names = {name for name, _ in source.tensors}
    importance = load_imatrix(args.imatrix) if args.imatrix else None
    if importance is not None:
        _check_names(importance, names, args.imatrix)
    head = _HEAD if _HEAD in names else _EMBEDDING

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    written: Counter = Counter()
    notes: list[str] = list(source.notes)
    try:
        writer = GGUFWriter(str(tmp), source.arch)
        source.write_metadata(writer)
        writer.add_file_type(int(_FILE_TYPES[qtype]))
        for name, read in (progress or (lambda ts: ts))(source.tensors):
            w = read()
            if w.ndim == 1:
                writer.add_tensor(name, w.astype(np.float32))
                written["F32"] += 1
                continue
            if w.ndim != 2:
                raise ModelFormatError(f"{src}: tensor {name} has {w.ndim} dimensions")
            want = head_type if name == head else qtype
            kind = fitted_type(want, w.shape[1], name)
            imp = _importance(importance, name, w.shape[1], notes)
            writer.add_tensor(name, encode(w, kind, imp), raw_dtype=kind)
            written[kind.name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"types": written, "notes": notes, "peak_rss_mib": peak}


def _type(name: str, flag: str) -> Q:
    if name not in TYPES:
        raise FlashserveError(f"{flag} {name!r} is not written by flashserve; choose from {', '.join(TYPES)}")
    return TYPES[name]


def _importance(imatrix: dict | None, name: str, cols: int, notes: list[str]) -> np.ndarray | None:
    if imatrix is None:
        return None
    imp = imatrix.get(name)
    if imp is None and name == _EMBEDDING:  # an untied embedding is looked up, never multiplied
        return None
    if imp is None:
        notes.append(f"{name}: no importance in the matrix, quantized without one")
        return None
    if imp.shape != (cols,):
        experts = (f", or {imp.size // cols} experts' columns of a 3-D tensor, which flashserve does not quantize"
                   if imp.size > cols and imp.size % cols == 0 else "")
        raise FlashserveError(f"the importance matrix has {imp.size} columns for {name}, whose rows hold {cols} "
                              f"weights: it was computed for another model{experts}")
    return imp


def _check_names(imatrix: dict, tensors: set[str], path: str) -> None:
    """Every weight the matrix names must be in the model: a name that is not means another model."""
    stray = sorted(set(imatrix) - tensors)
    if stray:
        raise FlashserveError(f"{path}: {len(stray)} of the importance matrix's {len(imatrix)} weights are not "
                              f"tensors of the model ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}): "
                              "it was computed for another model")
