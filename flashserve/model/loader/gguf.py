"""GGUF file → ModelConfig and a stream of (HF-style name, tensor) pairs.

Tensors are dequantized one at a time with the `gguf` package (every type it knows:
F32/F16/BF16, legacy Q4_0..Q8_0, K-quants, i-quants), so peak extra memory is one tensor;
or, for quantized execution, 2-D quantized tensors are handed on as raw blocks.
Names follow llama.cpp's tensor naming (gguf-py's constants); the llama-family Q/K
rows are un-permuted back to the rotate-half RoPE layout of HF checkpoints.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from flashserve.config import ModelConfig
from flashserve.errors import ModelFormatError
from flashserve.model.loader.gguf_file import open_gguf, read_gguf_metadata
from flashserve.model.models.registry import SUPPORTED
from flashserve.quantization.gguf_blocks import GGUFTensor

logger = logging.getLogger(__name__)

# GGUF architectures whose converter interleaves the Q/K rows for llama.cpp's RoPE.
_PERMUTED_QK = {"llama"}
# Gemma 3 alternates 5 sliding-window layers with 1 global layer unless the file says otherwise.
_GEMMA3_DEFAULT_SWA_PATTERN = 6
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_model_config(path: str) -> ModelConfig:
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch is None:
        raise ModelFormatError(f"{path}: GGUF metadata has no general.architecture")
    if arch not in SUPPORTED:
        raise ModelFormatError(
            f"{path}: unsupported model architecture {arch!r}; flashserve supports {', '.join(SUPPORTED)}"
        )

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise ModelFormatError(f"{path}: GGUF metadata lacks {full}")
            return default
        return meta[full]

    reader = open_gguf(path)
    tensor_names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelFormatError(f"{path}: no token_embd.weight tensor")
    hidden = int(get("embedding_length", required=True))
    num_heads = int(get("attention.head_count", required=True))
    num_kv_heads = int(_per_layer_first(get("attention.head_count_kv", num_heads)))
    num_layers = int(get("block_count", required=True))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]

    extra: dict = {}
    if arch == "gemma3":
        window = int(get("attention.sliding_window", 0)) or None
        pattern = get("attention.sliding_window_pattern", _GEMMA3_DEFAULT_SWA_PATTERN)
        if isinstance(pattern, list):
            sliding = tuple(bool(p) for p in pattern)
        else:
            sliding = tuple((i + 1) % int(pattern) != 0 for i in range(num_layers))
        extra = dict(
            hidden_act="gelu_pytorch_tanh",
            sliding_window=window,
            layer_is_sliding=sliding if window else (),
            rope_local_theta=10000.0,
            query_pre_attn_scalar=float(head_dim),
            attn_logit_softcap=get("attn_logit_softcapping"),
            final_logit_softcap=get("final_logit_softcapping"),
        )
    return ModelConfig(
        architecture=arch,
        vocab_size=int(embd.shape[1]),
        hidden_size=hidden,
        intermediate_size=int(_per_layer_first(get("feed_forward_length", required=True))),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(path, arch, get, reader),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos),
        **extra,
    )


def _per_layer_first(value):
    """Some GGUF files store per-layer arrays (e.g. head_count_kv); we need them uniform."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelFormatError(f"per-layer varying hyper-parameters are not supported: {value[:8]}...")
        return value[0]
    return value


def _rope_scaling(path, arch, get, reader) -> dict | None:
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:  # Llama 3.1 style: explicit per-frequency divisors
        return {"rope_type": "freq_factors", "factors": [float(x) for x in np.asarray(freqs.data, dtype=np.float32)]}
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    logger.warning("%s: rope scaling %r is not implemented; positions beyond the original context may degrade",
                   path, kind)
    return None


def _hf_name(gguf_name: str) -> str | None:
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def _ffn_norm_name(arch: str) -> str:
    # Llama's second norm sits before the MLP and HF calls it post_attention_layernorm;
    # Gemma 3 has both a post-attention and a pre-feed-forward norm.
    return "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rows: [x0, x_half, x1, x_half+1, ...] → halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(t) -> np.ndarray:
    """A GGUF tensor as float32 in row-major (rows = output features) layout."""
    from gguf import quants

    try:
        data = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ModelFormatError(f"tensor {t.name}: GGUF type {t.tensor_type.name} cannot be dequantized") from None
    shape = tuple(int(s) for s in reversed(t.shape))
    return np.asarray(data, dtype=np.float32).reshape(shape)


def iter_gguf_tensors(path: str, cfg: ModelConfig, keep_quantized: bool = False, skip=None
                      ) -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
    """With keep_quantized, 2-D block-quantized tensors come as GGUFTensor (raw blocks, rows
    still permuted like the float rows would be) for the model to pack; the rest as float32.
    `skip`: a predicate on the HF-style name; tensors it accepts are left unread."""
    reader = open_gguf(path)
    arch = cfg.architecture
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into cfg.rope_scaling
        name = _hf_name(t.name)
        if name is None and ".ffn_norm." in t.name:
            name = f"model.layers.{t.name.split('.')[1]}.{_ffn_norm_name(arch)}.weight"
        if name is None:
            raise ModelFormatError(f"{path}: unexpected tensor {t.name!r} for architecture {arch}")
        if skip is not None and skip(name):
            continue
        raw = keep_quantized and len(t.shape) == 2 and t.tensor_type not in _FLOAT_TYPES
        w = t.data if raw else dequantize_tensor(t)  # raw: (rows, bytes per row) uint8 blocks
        if arch in _PERMUTED_QK and (".q_proj." in name or ".k_proj." in name):
            # Blocks run along a row, so rows of raw bytes permute like rows of floats.
            w = _unpermute_qk(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        if raw:
            yield name, GGUFTensor(w, t.tensor_type, (int(t.shape[1]), int(t.shape[0])))
            continue
        if not w.flags.writeable or not w.flags.c_contiguous:  # a view of the read-only memory map
            w = np.array(w, order="C")
        yield name, torch.from_numpy(w)
