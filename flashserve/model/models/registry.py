"""Architecture name (ModelConfig.architecture) → model class."""
from __future__ import annotations

from flashserve.errors import ModelFormatError

SUPPORTED = ("llama", "qwen2", "gemma3")


def model_class(architecture: str):
    if architecture in ("llama", "qwen2"):
        from flashserve.model.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if architecture == "gemma3":
        from flashserve.model.models.gemma3 import Gemma3ForCausalLM

        return Gemma3ForCausalLM
    raise ModelFormatError(
        f"unsupported model architecture {architecture!r}; flashserve supports {', '.join(SUPPORTED)}"
    )
