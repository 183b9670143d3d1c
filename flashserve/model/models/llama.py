"""Llama family: Llama 2/3, Mistral, SmolLM2, and Qwen2 (the same block with q/k/v biases).

    x = embed(ids)
    for each layer:  h = x + attn(norm(x));  x = h + mlp(norm(h))     (pre-norm, SwiGLU)
    logits = lm_head(norm(x))
"""
from __future__ import annotations

import torch
from torch import nn

from flashserve.attention.metadata import AttentionMetadata
from flashserve.config import ModelConfig
from flashserve.model.layers.activation import get_act_and_mul
from flashserve.model.layers.attention import Attention
from flashserve.model.layers.embedding import VocabEmbedding
from flashserve.model.layers.linear import Linear, MergedLinear
from flashserve.model.layers.norm import RMSNorm
from flashserve.model.layers.rotary import RotaryEmbedding
from flashserve.model.models.base import CausalLM


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": cfg.intermediate_size, "up": cfg.intermediate_size})
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act_and_mul = get_act_and_mul(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.forward_residual(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm.forward_residual(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (T, d)

    def forward(self, input_ids, positions, meta):
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm.forward_residual(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.model = LlamaModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
