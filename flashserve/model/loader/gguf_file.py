"""Open a GGUF file once, with clear errors for truncated, corrupted or non-GGUF files.

The `gguf` package memory-maps the file; tensors stay on disk until read.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from flashserve.errors import ModelFormatError

GGUF_MAGIC = b"GGUF"


@lru_cache(maxsize=4)
def open_gguf(path: str):
    """A gguf.GGUFReader for `path`, or ModelFormatError naming what is wrong with the file."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"model file not found: {path}")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(str(p), "r")
    except Exception as exc:  # the gguf package raises assorted errors on damaged headers
        raise ModelFormatError(f"{path}: corrupted or truncated GGUF header ({type(exc).__name__}: {exc})") from None
    size = p.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFormatError(
                f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end} but the file has {size} bytes"
            )
    return reader


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata as plain Python values (lists for arrays, str for strings)."""
    reader = open_gguf(str(path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as exc:
            raise ModelFormatError(f"{path}: unreadable metadata field {key!r} ({exc})") from None
    return meta
