"""Gemma 3 (text): Llama-like blocks with sandwich norms, q/k norms, GeGLU, scaled embeddings,
and sliding-window layers interleaved with global ones, each kind with its own RoPE base.

    x = embed(ids) * sqrt(d)
    for each layer:  h = x + post_attn_norm(attn(pre_norm(x)))
                     x = h + post_ffw_norm(mlp(pre_ffw_norm(h)))
"""
from __future__ import annotations

import torch
from torch import nn

from flashserve.config import ModelConfig
from flashserve.model.layers.attention import Attention
from flashserve.model.layers.embedding import VocabEmbedding
from flashserve.model.layers.norm import RMSNorm
from flashserve.model.layers.rotary import RotaryEmbedding
from flashserve.model.models.base import CausalLM
from flashserve.model.models.llama import GatedMLP


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(cfg, layer, rotary, qk_norm=True)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.mlp = GatedMLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, positions, x, meta):
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = cfg.hidden_size**0.5
        global_rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        local_rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_local_theta or 10000.0)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, i, local_rope if cfg.sliding_window_of(i) else global_rope)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, d)
        # The scale is rounded to the compute dtype first, as the reference implementation does.
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def forward(self, input_ids, positions, meta):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.model = Gemma3Model(cfg)
        self.lm_head = None  # Gemma ties the output projection to the embedding

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # HF Gemma checkpoints store (multiplier - 1) for every RMSNorm; GGUF files store the multiplier.
        return tensor + 1.0 if name.endswith("norm.weight") else tensor
