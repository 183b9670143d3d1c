"""Tiny random-weight models built with transformers' own classes, saved as safetensors
and written as GGUF (the way llama.cpp's converter lays them out), for exact comparisons."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VOCAB = 256


def hf_tiny(arch: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "llama":  # GQA 4:2, llama3 RoPE scaling to cover that path too
        cfg = tf.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **common,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64})
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":  # MQA and q/k/v biases
        cfg = tf.Qwen2Config(num_hidden_layers=2, num_key_value_heads=1, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":  # 6 layers: 5 sliding (window 5) + 1 global
        common.update(tie_word_embeddings=True)
        cfg = tf.Gemma3TextConfig(num_hidden_layers=6, num_key_value_heads=2, head_dim=32,
                                  sliding_window=5, query_pre_attn_scalar=32, **common)
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random norm weights and biases, so a mix-up of them is visible
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if arch == "gemma3" or name.endswith(".bias") else 1.0))
    model.config._attn_implementation = "eager"
    return model.eval()


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the two RoPE halves of each head's rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm",
}


def write_gguf(model, path: Path, qtype: str = "F32", qtype_of: dict[str, str] | None = None,
               encode=None) -> Path:
    """GGUF per the spec (github.com/ggml-org/ggml/blob/master/docs/gguf.md) with llama.cpp's tensor names.
    encode(array, qtype) → the tensor's blocks as bytes; gguf-py's quantizer by default (it has none
    for some types: a test may write random valid blocks instead)."""
    import gguf

    cfg = model.config
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
        w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    tensors: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + 1.0  # llama.cpp stores Gemma's (1 + w)
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = a
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = a
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                tensors["output.weight"] = a
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module == "post_attention_layernorm":
                gname = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
            elif module == "pre_feedforward_layernorm":
                gname = "ffn_norm"
            else:
                gname = _GGUF_LAYER[module]
            if arch == "llama" and gname in ("attn_q", "attn_k"):
                a = _llamacpp_permute(a, cfg.num_attention_heads if gname == "attn_q" else cfg.num_key_value_heads)
            tensors[f"blk.{layer}.{gname}.{kind}"] = a
    if arch == "llama":  # Llama 3.1 files carry the scaled frequencies as a tensor
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        tensors["rope_freqs.weight"] = (base / inv_scaled.double()).float().numpy()
    for name, a in tensors.items():
        # qtype_of: another type for the tensors whose name holds a key (e.g. {"attn_v": "Q8_0"})
        this = next((t for key, t in (qtype_of or {}).items() if key in name), qtype)
        if a.ndim == 2 and this != "F32" and not name.startswith("token_embd"):
            q = gguf.GGMLQuantizationType[this]
            w.add_tensor(name, (encode or gguf.quants.quantize)(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
