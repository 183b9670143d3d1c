"""Model loading: a GGUF file or an HF directory → (ModelConfig, model with weights)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from flashserve import startup_phases
from flashserve.config import (ACTIVATION_METHODS, QUANTIZATION_CHOICES, ActivationQuantConfig, HotNeuronConfig,
                               ModelConfig)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def load_model_config(path: str) -> ModelConfig:
    if Path(path).is_dir():
        from flashserve.model.loader.hf import hf_model_config

        return hf_model_config(path)
    from flashserve.model.loader.gguf import gguf_model_config

    return gguf_model_config(path)


def load_model(path: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
               quantization: str = "none", max_weight_memory: int | None = None,
               activation_quant: ActivationQuantConfig | None = None, hot_neurons: HotNeuronConfig | None = None,
               max_positions: int | None = None):
    """Returns (model in eval mode on `device`, its ModelConfig).

    max_weight_memory: bytes of weights resident at once; the decoder layers beyond what it holds
    stream from a file of packed layers (offload/layer_streaming.py; GGUF files on the CPU).

    quantization: "none" dequantizes every weight to `dtype`; "weight-only" keeps a GGUF file's (or a
    GPTQ/AWQ checkpoint's) quantized weights packed for the int4/int8 CPU kernels (flashserve/quantization)
    and multiplies them with float activations; "auto" does too, but for a GGUF file the project's
    kernel rounds activations to int8 per group of 32 (llama.cpp's arithmetic; faster, see
    benchmarks/RESULTS.md). A GPTQ/AWQ checkpoint keeps float activations under "auto".
    "smoothquant" and "llm.int8" load the weights as floats, then turn the decoder linears into int8
    weights with int8-rounded activations (quantization/activation_methods.py; options: activation_quant).

    hot_neurons: a neuron profile whose predictor skips cold FFN neurons, exact or off (offload/hot_cold.py).
    dtype: the compute dtype, float32 when None.
    max_positions: the positions the rotary tables cover (an engine's max_model_len), the model's own
    context when None: Gemma 3's two tables for 32k positions are 64 MiB."""
    import torch  # here, not at the top: the package's torch-free parts (GGUF metadata) are read before it

    from flashserve.model.models.registry import model_class
    from flashserve.quantization.codebook_weight import CodebookWeight
    from flashserve.quantization.group_quant_weight import GroupQuantWeight

    dtype = dtype or torch.float32
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATION_CHOICES)}")
    cfg = load_model_config(path)
    int8_method = quantization in ACTIVATION_METHODS
    if int8_method:
        from flashserve.quantization import activation_methods

        activation_methods.check_source(path, cfg, quantization)
    keep_quantized = quantization != "none" and not int8_method
    if torch.device(device).type == "cpu":
        from flashserve.kernels import ops

        ops.available()  # loads (or builds) the C++ kernels: here, so that a start's phases show it alone
        startup_phases.mark("C++ kernels loaded")
    cls = model_class(cfg.architecture)
    built_cfg = cfg if max_positions is None else replace(
        cfg, max_position_embeddings=min(cfg.max_position_embeddings, max_positions))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created directly in the compute dtype
    try:
        with torch.device(device):
            model = cls(built_cfg)
    finally:
        torch.set_default_dtype(previous)
    startup_phases.mark("model built (modules, rotary tables)")
    if Path(path).is_dir():
        from flashserve.model.loader.hf import iter_hf_weights

        model.load_weights(iter_hf_weights(path, keep_quantized=keep_quantized), hf_checkpoint=True)
    elif max_weight_memory is not None:
        from flashserve.model.loader.gguf_file import open_gguf
        from flashserve.offload.layer_streaming import load_streamed

        if torch.device(device).type != "cpu":
            raise ValueError("max_weight_memory streams layers on the CPU only")
        model.layer_streamer = load_streamed(model, path, cfg, quantization, max_weight_memory)
        open_gguf.cache_clear()
    else:
        from flashserve.model.loader.gguf import iter_gguf_tensors
        from flashserve.model.loader.gguf_file import open_gguf

        model.load_weights(iter_gguf_tensors(path, cfg, keep_quantized=keep_quantized), hf_checkpoint=False)
        # The cached reader holds the file's memory map (now paged in) and its parsed metadata (the
        # vocabulary as numpy arrays): 220 MiB resident for SmolLM2, measured. No weight views it.
        open_gguf.cache_clear()
    startup_phases.mark("weights read and packed")
    if quantization == "auto" and not Path(path).is_dir():
        for module in model.modules():
            if isinstance(module, (GroupQuantWeight, CodebookWeight)):
                module.set_int8_activations(True)
    if int8_method:
        activation_methods.apply(model, cfg, path, quantization, activation_quant or ActivationQuantConfig())
    if hot_neurons is not None and hot_neurons.profile is not None:
        from flashserve.offload.hot_cold import apply_hot_neurons

        apply_hot_neurons(model, hot_neurons)
    logger.info("loaded %s (%s, %d layers) as %s, quantization=%s", path, cfg.architecture, cfg.num_layers, dtype,
                quantization)
    return model.eval(), cfg
