"""Self-attention block over the paged KV cache (q/k/v projection, RoPE, paged attention, output)."""
from __future__ import annotations

import torch
from torch import nn

from flashserve.attention.backend import paged_attention
from flashserve.attention.metadata import AttentionMetadata
from flashserve.config import ModelConfig
from flashserve.model.layers.linear import Linear, MergedLinear
from flashserve.model.layers.norm import RMSNorm
from flashserve.model.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size)
        # Gemma 3 normalizes each head's q and k before RoPE.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.scale = cfg.attn_scale
        self.sliding_window = cfg.sliding_window_of(layer)
        self.logit_softcap = cfg.attn_logit_softcap
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (blocks, block_size, Hk, D) each

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(T, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, Hk, D)
        v = v.view(T, self.num_kv_heads, self.head_dim)  # (T, Hk, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        k_cache, v_cache = self.kv_cache
        out = paged_attention(
            q, k, v, k_cache, v_cache, meta, self.scale,
            sliding_window=self.sliding_window, logit_softcap=self.logit_softcap,
        )  # (T, Hq, D)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))
