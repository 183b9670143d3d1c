"""The small networks that draft from the target's last hidden states, and their files.

Both reuse the target's own frozen LM head (and EAGLE its token embedding), so a heads file holds
only what was trained here: a `.safetensors` of the weights and a `.json` beside it (same stem)
whose fields are config.SpecHeadsConfig, checked against the target at start-up.

Medusa-1 (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple
Decoding Heads", eq. 1): head i is one residual block on the feature h_t at position t,

    p_t^(i) = softmax(W_head · (h_t + SiLU(W_i h_t + b_i)))        predicting token t + i + 2

(the target's own head predicts t + 1). W_i starts at zero, so every head starts as the LM head.

EAGLE-1 (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty",
section 4): one decoder layer over the sequence of (feature f_j, embedding of token t_{j+1}),
fused by a linear layer, regresses the next feature:

    f^_{j+1} = Layer(FC([f_j ; e(t_{j+1})]))     token t_{j+2} ~ softmax(W_head · f^_{j+1})

Drafting feeds its own f^ back in, one token at a time. Features here are the target's hidden
states after its final norm, the input of its LM head.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.config import ModelConfig, SpecHeadsConfig


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, hidden_size, hidden_size))  # (heads, d_out, d_in)
        self.bias = nn.Parameter(torch.zeros(num_heads, hidden_size))  # (heads, d)

    def forward(self, h: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """h: (N, d) features → (heads, N, d), each head's input to the LM head (the first num_heads only)."""
        w, b = self.weight[:num_heads], self.bias[:num_heads]
        z = torch.einsum("nd,hed->hne", h, w) + b[:, None, :]
        return h + F.silu(z)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (Su et al. 2021) on x (B, heads, n, hd) at positions (n,), halves rotated as pairs."""
    hd = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd)  # (hd/2,)
    angles = positions.to(torch.float32)[:, None] * inv_freq  # (n, hd/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class EagleLayer(nn.Module):
    """FC over [feature ; token embedding], then one pre-norm decoder layer (attention + SwiGLU)."""

    def __init__(self, cfg: SpecHeadsConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, features: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """features, token_embeds: (B, n, d) for positions (n,), consecutive after `past`'s keys and
        values (B, kv_heads, m, hd) → predicted next features (B, n, d) and the keys/values of all
        m + n positions. Row i attends to the past and rows <= i (sequences padded on the right)."""
        cfg = self.cfg
        B, n, _ = features.shape
        x = self.fc(torch.cat((features, token_embeds), dim=-1))  # (B, n, d)
        h = rms_norm(x, self.attn_norm, cfg.rms_norm_eps)
        q = self.q_proj(h).view(B, n, -1, cfg.head_dim).transpose(1, 2)  # (B, H, n, hd)
        k = self.k_proj(h).view(B, n, -1, cfg.head_dim).transpose(1, 2)  # (B, KV, n, hd)
        v = self.v_proj(h).view(B, n, -1, cfg.head_dim).transpose(1, 2)
        q, k = rotate(q, positions, cfg.rope_theta), rotate(k, positions, cfg.rope_theta)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        m = k.shape[2] - n
        mask = torch.arange(m + n, device=x.device)[None, :] <= m + torch.arange(n, device=x.device)[:, None]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, n, hd)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, n, -1))
        h = rms_norm(x, self.mlp_norm, cfg.rms_norm_eps)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, (k, v)


def heads_config_for(method: str, target: ModelConfig, name: str, num_heads: int = 1) -> SpecHeadsConfig:
    """A new heads file's description: sizes from the target (EAGLE's layer takes its attention shape)."""
    return SpecHeadsConfig(method=method, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                           num_heads=num_heads, num_attention_heads=target.num_heads,
                           num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
                           intermediate_size=target.intermediate_size, rope_theta=target.rope_theta,
                           rms_norm_eps=target.rms_norm_eps, target=name)


def build_heads(cfg: SpecHeadsConfig) -> nn.Module:
    if cfg.method == "medusa":
        return MedusaHeads(cfg.num_heads, cfg.hidden_size)
    if cfg.method == "eagle":
        return EagleLayer(cfg)
    raise ValueError(f"unknown heads method {cfg.method!r}; choose medusa or eagle")


def sidecar(path: str | Path) -> Path:
    """The JSON description beside a heads file: x.safetensors → x.json."""
    return Path(path).with_suffix(".json")


def save_heads(path: str | Path, module: nn.Module, cfg: SpecHeadsConfig, training: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in module.state_dict().items()}, str(path))
    sidecar(path).write_text(json.dumps(asdict(cfg) | {"training": training or {}}, indent=2) + "\n")


def read_heads_config(path: str | Path) -> SpecHeadsConfig:
    """The heads file's description; FileNotFoundError / ValueError naming the file when absent or malformed."""
    path, meta = Path(path), sidecar(path)
    for f in (path, meta):
        if not f.is_file():
            raise FileNotFoundError(f"speculative heads: {f} does not exist (train heads with "
                                    "python -m flashserve.spec_decode.train; the .json is written beside the .safetensors)")
    try:
        raw = json.loads(meta.read_text())
        known = {f.name for f in fields(SpecHeadsConfig)}
        return SpecHeadsConfig(**{k: v for k, v in raw.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"speculative heads: {meta} is not a heads description: {exc}") from None


def load_heads(path: str | Path, cfg: SpecHeadsConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The trained module, every tensor present and of the shape `cfg` implies (ValueError naming it otherwise)."""
    from safetensors.torch import load_file

    module = build_heads(cfg)
    tensors = load_file(str(path))
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"speculative heads {path}: tensors missing {missing[:3]}, unexpected {extra[:3]} "
                         f"for {cfg.method} heads as {sidecar(path).name} describes them")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"speculative heads {path}: {name} has shape {tuple(t.shape)}, but "
                             f"{sidecar(path).name} implies {tuple(expected[name].shape)}")
    module.load_state_dict(tensors)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)
