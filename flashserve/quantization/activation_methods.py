"""quantization="smoothquant" | "llm.int8": a float model, just loaded, gets int8 decoder linears that
round their activations to int8 on every call. The embedding, the LM head and the norms stay float.

    smoothquant  activation maxima from calibration text run through this model (calibrate.py), the
                 scales folded into the norms (and optionally up_proj's rows) and weights
                 (smoothquant.py), then W8A8Weight (w8a8.py)
    llm.int8     OutlierInt8Weight (int8_outlier.py): outlier input columns float, the rest int8
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from flashserve.config import ActivationQuantConfig, ModelConfig
from flashserve.errors import ModelFormatError
from flashserve.model.layers.linear import Linear
from flashserve.quantization.int8_outlier import OutlierInt8Weight
from flashserve.quantization.w8a8 import W8A8Weight

SMOOTHED_ARCHITECTURES = ("llama", "qwen2")  # one RMSNorm before q|k|v and one before gate|up
DEFAULT_CALIBRATION_TEXT = "/usr/share/common-licenses/GPL-3"  # ships with Debian; as `flashserve quantize`
CALIBRATION_SEQ_LEN = 512
CALIBRATION_SEQS = 4  # 2048 tokens (SmolLM2-135M: ~4 s, 2 threads)


def check_source(path: str, cfg: ModelConfig, method: str) -> None:
    """Refuses what the method cannot start from: an already-quantized checkpoint, or (SmoothQuant) an
    architecture whose norms it does not know how to fold into."""
    if Path(path).is_dir():
        from flashserve.model.loader.hf import is_int4_checkpoint

        if is_int4_checkpoint(path):
            raise ModelFormatError(f"{path} is a GPTQ/AWQ checkpoint; quantization={method!r} needs float weights "
                                   "(an HF float checkpoint or a GGUF file, which is dequantized)")
    if method == "smoothquant" and cfg.architecture not in SMOOTHED_ARCHITECTURES:
        raise ModelFormatError(f"quantization='smoothquant' folds its scales into Llama-family norms "
                               f"({', '.join(SMOOTHED_ARCHITECTURES)}); {path} is {cfg.architecture!r}")


def apply(model: nn.Module, cfg: ModelConfig, path: str, method: str, options: ActivationQuantConfig) -> None:
    layers = model.model.layers
    if method == "smoothquant":
        from flashserve.quantization.calibrate import cut_sequences, engine_input_maxima
        from flashserve.quantization.smoothquant import smooth, smoothed_pairs

        ids = cut_sequences(calibration_tokens(path, options.calibration_text),
                            min(CALIBRATION_SEQ_LEN, cfg.max_position_embeddings), CALIBRATION_SEQS,
                            options.calibration_text or DEFAULT_CALIBRATION_TEXT)
        down = options.smoothquant_down_proj
        linears = [linear for layer in layers for _, linear in smoothed_pairs(layer, down)]
        smooth(layers, engine_input_maxima(model, cfg, ids, linears), options.smoothquant_alpha, down)
        make = W8A8Weight
    else:
        make = lambda w: OutlierInt8Weight(w, options.llm_int8_threshold)  # noqa: E731
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, Linear):
                m.set_quantized(make(m.weight.data))


def calibration_tokens(path: str, text_file: str | None) -> list[int]:
    from flashserve.errors import FlashserveError
    from flashserve.tokenizer.tokenizer import Tokenizer

    source = text_file or DEFAULT_CALIBRATION_TEXT
    try:
        text = Path(source).read_text(errors="replace")
    except OSError as exc:
        raise FlashserveError(f"{source}: cannot read the calibration text ({exc.strerror})") from None
    return Tokenizer.from_model_path(path).encode(text, add_special_tokens=False) if text.strip() else []
