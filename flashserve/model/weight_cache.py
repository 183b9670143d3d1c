"""A model's final CPU weights (packed for the kernels, in their tiles), saved once per model file and
configuration and memory-mapped on later starts. Packing a GGUF file costs seconds (the Q4_K and Q6_K
blocks rewritten, the tiles built, every byte written into fresh memory); mapping the saved result
costs a fraction of one, and its pages are the page cache's: shared by every process that maps them,
read from disk only on the first start after a boot, touched only when a step reads them.

    <cache>/weights/<model stem>-<path digest>-<key>.pt     torch.save of the model object (this package's
                                                           classes), read back with torch.load(mmap=True)
    <cache>/weights/<the same name>.json                   {"model": the model file's path}

The key covers all that decides the weights: the model file (path, size, mtime), quantization, dtype,
activation quantization (and its calibration text's size and mtime), the kernels' build (their level:
the tiles' layout), torch's version and the source of this package (any change to the code that packs
gives a new key: no version to bump by hand). The rotary tables are not saved: they depend on the
context length and are rebuilt at load. Entries of the same model file with another key are removed
when one is written, so a model keeps one entry, and so are the entries of model files that no longer
exist.

Not cached: tensor or pipeline parallel ranks, layer streaming, hot/cold neurons (each changes the model
after loading), checkpoint directories, and a device other than the CPU. A file that does not load
(truncated, or written by something else) is removed and the model is packed again."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from flashserve.config import EngineConfig

logger = logging.getLogger(__name__)

_SUFFIX = ".pt"


class WeightCache:
    def __init__(self, path: Path):
        self.path = path

    def load(self, max_positions: int) -> nn.Module | None:
        """The saved model, its tensors mapped from the file, rotary tables built for `max_positions`;
        None when there is no entry or it does not load (then it is removed)."""
        from flashserve.model.layers.rotary import RotaryEmbedding

        if not self.path.exists():
            return None
        try:
            # Our own file, written by store() below from our classes: a full unpickle.
            model = torch.load(self.path, mmap=True, weights_only=False)
            if not isinstance(model, nn.Module):
                raise ValueError(f"holds a {type(model).__name__}, not a model")
        except Exception as exc:  # noqa: BLE001 - a bad entry of any kind is packed again, never trusted
            logger.warning("ignoring the weight cache entry %s, which does not load (%s); packing the model again",
                           self.path, exc)
            self.path.unlink(missing_ok=True)
            return None
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.build_tables(max_positions)
        return model.eval()

    def store(self, model: nn.Module, model_path: str) -> None:
        """Save the model (written to a temporary name, then renamed: a reader never sees half a file),
        and remove the entries of this model file's other keys and of model files that are gone. A
        cache that cannot be written only costs the next start its packing."""
        from torch.utils.serialization import config as serialization

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        crc = serialization.save.compute_crc32
        # The zip's checksums cost a pass over every byte at the first start, and a mapped load never
        # reads them; a broken entry fails to load (the pickle, the zip directory) or is keyed away.
        serialization.save.compute_crc32 = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model, tmp)
            os.replace(tmp, self.path)
            self.path.with_suffix(".json").write_text(json.dumps({"model": model_path}))
        except Exception as exc:  # noqa: BLE001 - no disk space, a read-only cache, a module that does not pickle
            logger.warning("cannot write the weight cache entry %s (%s)", self.path, exc)
            tmp.unlink(missing_ok=True)
            return
        finally:
            serialization.save.compute_crc32 = crc
        prefix = self.path.name[:self.path.name.rindex("-") + 1]
        for other in self.path.parent.glob(f"*{_SUFFIX}"):
            if other != self.path and (other.name.startswith(prefix) or not _model_exists(other)):
                other.unlink(missing_ok=True)
                other.with_suffix(".json").unlink(missing_ok=True)


def _model_exists(entry: Path) -> bool:
    """Whether the model file an entry was saved from still exists (True when that is unknown)."""
    try:
        return Path(json.loads(entry.with_suffix(".json").read_text())["model"]).exists()
    except (OSError, ValueError, KeyError, TypeError):
        return True


def weight_cache(config: EngineConfig, device: torch.device, ranks: int) -> WeightCache | None:
    """The cache entry for this engine's model, or None when its weights are not cached (above)."""
    path = Path(config.model_path)
    if (not config.weight_cache or torch.device(device).type != "cpu" or ranks > 1 or path.is_dir()
            or config.max_weight_memory is not None or config.hot_neurons.profile is not None):
        return None
    from flashserve.kernels import ops
    from flashserve.model.catalogue import cache_dir

    where = str(path.resolve())
    kernels = ops.native()  # its name holds its level and its sources' digest; None: torch's twins pack
    calibration = config.activation_quant.calibration_text  # SmoothQuant's maxima come from this text
    key = repr([where, _file_identity(path), config.quantization, config.dtype, repr(config.activation_quant),
                calibration and _file_identity(Path(calibration)), getattr(kernels, "__name__", None),
                torch.__version__, _source_digest()])
    name = f"{path.stem}-{_digest(where)[:8]}-{_digest(key)[:16]}{_SUFFIX}"  # the model's entries share a prefix
    return WeightCache(cache_dir() / "weights" / name)


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@lru_cache(maxsize=1)
def _source_digest() -> str:
    """sha256 over this package's Python and C++ sources (paths and contents)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".h") and p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
