"""The tokenizer built from a GGUF file, kept in the flashserve cache directory.

Building it means importing transformers and converting the vocabulary (about 3 s for SmolLM2,
far more for Gemma 3's 262k tokens); loading the cached `tokenizers` JSON takes a fraction of a
second. One entry per model file, keyed by the file's identity: its size, its mtime, a sha256 of
its header (the metadata the tokenizer is made from) and the versions of the libraries that
convert and read it. An entry is

    one line of JSON: {"key": identity, "digest": sha256 of what follows, "spec": {...},
                       "model": the model file's resolved path}
    the backend tokenizer's JSON (tokenizers.Tokenizer.to_str())

and it is used only when the key matches and the digest checks; anything else is a miss, and the
caller rebuilds and rewrites it. Writes go through a temporary file and a rename, so a reader never
sees half an entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT = 1  # raise when what an entry holds changes


def entry_path(model: Path) -> Path:
    from flashserve.model.catalogue import cache_dir

    name = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"{model.stem}-{name}.tok"


def load(model: Path) -> tuple[dict, str] | None:
    """(spec, backend JSON) cached for this exact model file, or None."""
    path = entry_path(model)
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        head, _, body = raw.partition(b"\n")
        header = json.loads(head)
        if header["key"] != identity(model):
            logger.info("tokenizer cache entry %s is for another version of the model file; rebuilding", path)
            return None
        if header["digest"] != hashlib.sha256(body).hexdigest():
            raise ValueError("content does not match its digest")
        return header["spec"], body.decode("utf-8")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        logger.warning("ignoring the corrupt tokenizer cache entry %s (%s)", path, exc)
        return None


def store(model: Path, spec: dict, backend_json: str) -> None:
    """Write the entry; a cache that cannot be written only costs the next start its build time."""
    path = entry_path(model)
    body = _with_merges_as_strings(backend_json).encode("utf-8")
    header = {"key": identity(model), "digest": hashlib.sha256(body).hexdigest(), "spec": spec,
              "model": str(model.resolve())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(header).encode() + b"\n" + body)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        logger.warning("cannot write the tokenizer cache entry %s (%s)", path, exc)
        return
    _remove_entries_of_missing_models(path.parent)


def _remove_entries_of_missing_models(directory: Path) -> None:
    """Entries whose model file is gone (deleted or moved, or a test's temporary file) are removed when
    a new entry is written, so the directory does not grow with every path a model was ever read from.
    Entries that do not name their model (written before they did) are left."""
    for entry in directory.glob("*.tok"):
        try:
            with entry.open("rb") as f:
                model = json.loads(f.readline()).get("model")
            if model and not Path(model).exists():
                entry.unlink()
        except (OSError, ValueError, AttributeError):  # unreadable, or another process removed it first
            continue


def _with_merges_as_strings(backend_json: str) -> str:
    """A BPE's merges as "left right" strings, the form `tokenizers` also reads, when no token of a
    merge holds a space (so the split is unambiguous); else as the pairs to_str() writes. Gemma 3's
    515k merges load in about three quarters of the time as strings (RESULTS.md, issue 23)."""
    spec = json.loads(backend_json)
    model = spec.get("model", {})
    merges = model.get("merges") if model.get("type") == "BPE" else None
    if not merges or not all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        return backend_json
    model["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(spec, ensure_ascii=False)


def identity(model: Path) -> dict:
    st = model.stat()
    return {
        "format": FORMAT,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "header_sha256": _header_digest(model),
        "transformers": version("transformers"),  # converts the GGUF vocabulary
        "tokenizers": version("tokenizers"),  # writes and reads the JSON
    }


def _header_digest(model: Path) -> str:
    """sha256 of the bytes before the first tensor's data: the metadata and the tensor records."""
    from flashserve.model.loader.gguf_file import open_gguf

    tensors = open_gguf(str(model)).tensors
    end = min((t.data_offset for t in tensors), default=model.stat().st_size)
    with model.open("rb") as f:
        return hashlib.sha256(f.read(end)).hexdigest()
