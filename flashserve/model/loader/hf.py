"""Hugging Face model directory (config.json + *.safetensors) → ModelConfig and named tensors.

A GPTQ or AWQ checkpoint (config.json's quantization_config) has each linear as packed 4-bit tensors;
they arrive gathered into one weight per linear (quantization/int4_format.py)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from flashserve.config import ModelConfig
from flashserve.errors import ModelFormatError
from flashserve.model.models.registry import SUPPORTED
from flashserve.quantization.int4_format import Int4Groups, int4_format, read_int4

# HF model_type → our architecture key
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _read_config(path: str) -> dict:
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{f}: unreadable ({exc})") from None


def hf_model_config(path: str) -> ModelConfig:
    d = Path(path)
    raw = _read_config(path)
    c = raw.get("text_config", raw) if raw.get("model_type") == "gemma3" else raw
    model_type = c.get("model_type", raw.get("model_type"))
    arch = _ARCH.get(model_type)
    if arch is None:
        raise ModelFormatError(
            f"{path}: unsupported model_type {model_type!r}; flashserve supports {', '.join(SUPPORTED)}"
        )
    heads = c["num_attention_heads"]
    eos = c.get("eos_token_id", raw.get("eos_token_id"))
    gen = d / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    rope_scaling = c.get("rope_scaling")
    rope_params = c.get("rope_parameters")  # transformers 5 layout
    theta = c.get("rope_theta", 10000.0)
    local_theta = c.get("rope_local_base_freq")
    if isinstance(rope_params, dict):
        if "full_attention" in rope_params:  # per-attention-kind parameters (Gemma 3)
            full, local = rope_params["full_attention"], rope_params.get("sliding_attention", {})
            theta, local_theta = full.get("rope_theta", theta), local.get("rope_theta", local_theta)
            rope_params = full
        theta = rope_params.get("rope_theta", theta)
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    extra: dict = {}
    if arch == "gemma3":
        layer_types = c.get("layer_types")
        num_layers = c["num_hidden_layers"]
        if layer_types:
            sliding = tuple(t == "sliding_attention" for t in layer_types)
        else:
            pattern = c.get("sliding_window_pattern", 6)
            sliding = tuple((i + 1) % pattern != 0 for i in range(num_layers))
        extra = dict(
            sliding_window=c.get("sliding_window"),
            layer_is_sliding=sliding,
            rope_local_theta=float(local_theta or 10000.0),
            query_pre_attn_scalar=c.get("query_pre_attn_scalar"),
            attn_logit_softcap=c.get("attn_logit_softcapping"),
            final_logit_softcap=c.get("final_logit_softcapping"),
        )
    return ModelConfig(
        architecture=arch,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", raw.get("tie_word_embeddings", arch == "gemma3"))),
        attention_bias=bool(c.get("attention_bias", arch == "qwen2")),
        hidden_act=c.get("hidden_activation") or c.get("hidden_act", "silu"),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=eos_ids,
        **extra,
    )


def _text_name(name: str) -> str | None:
    """Map multimodal checkpoint names onto the text model; None for vision parts."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    if "vision_tower" in name or "multi_modal_projector" in name:
        return None
    return name


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path}: no *.safetensors files")
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as exc:
            raise ModelFormatError(f"{f}: unreadable safetensors file ({exc})") from None
        with handle:
            for name in handle.keys():
                mapped = _text_name(name)
                if mapped is not None:
                    yield mapped, handle.get_tensor(name)


def iter_hf_weights(path: str, keep_quantized: bool) -> Iterator[tuple[str, torch.Tensor | Int4Groups]]:
    """The directory's tensors; a GPTQ/AWQ linear as one Int4Groups weight (keep_quantized) or dequantized."""
    raw = _read_config(path)
    fmt = int4_format(raw.get("quantization_config"), f"{path}/config.json")
    tensors = iter_safetensors(path)
    return tensors if fmt is None else read_int4(tensors, fmt, keep_quantized)


def is_int4_checkpoint(path: str) -> bool:
    """Whether config.json declares a GPTQ/AWQ checkpoint (one flashserve reads, or an error)."""
    return int4_format(_read_config(path).get("quantization_config"), f"{path}/config.json") is not None
