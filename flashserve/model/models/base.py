"""What every causal LM here shares: KV binding, logits, and loading HF-named weights
into fused projections (q|k|v → qkv_proj, gate|up → gate_up_proj)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flashserve.config import ModelConfig
from flashserve.errors import ModelFormatError
from flashserve.model.layers.attention import Attention
from flashserve.model.layers.linear import MergedLinear

# checkpoint projection name → (fused module name, part)
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class CausalLM(nn.Module):
    model: nn.Module
    lm_head: nn.Module | None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg

    def bind_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        if len(layers) != len(kv_caches):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(layers)} attention layers")
        for attn, cache in zip(layers, kv_caches):
            attn.kv_cache = cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """input_ids, positions: (T,) → hidden states (T, d) after the final norm."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) → (N, vocab) float32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = (hidden @ weight.t()).float()
        cap = self.config.final_logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Hook for HF-checkpoint conventions that differ from our parameters (Gemma's norms)."""
        return tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], hf_checkpoint: bool) -> None:
        """Copy (HF-style name, tensor) pairs into the parameters; every parameter must be filled."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        filled: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still carry a copy
            if hf_checkpoint:
                tensor = self.checkpoint_transform(name, tensor)
            module_name, _, kind = name.rpartition(".")
            parent, _, proj = module_name.rpartition(".")
            if proj in _FUSED:
                fused, part = _FUSED[proj]
                target = modules.get(f"{parent}.{fused}")
                if not isinstance(target, MergedLinear):
                    raise ModelFormatError(f"checkpoint tensor {name!r} has no place in this model")
                target.load_part(part, kind, tensor)
                filled.add(f"{parent}.{fused}.{kind}:{part}")
                continue
            param = params.get(name)
            if param is None:
                raise ModelFormatError(f"checkpoint tensor {name!r} has no place in this model")
            if param.shape != tensor.shape:
                raise ModelFormatError(f"{name}: expected shape {tuple(param.shape)}, file has {tuple(tensor.shape)}")
            param.data.copy_(tensor)
            filled.add(name)
        self._check_all_filled(params, modules, filled)

    def _check_all_filled(self, params, modules, filled: set[str]) -> None:
        missing = []
        for name in params:
            module_name, _, kind = name.rpartition(".")
            module = modules[module_name]
            if isinstance(module, MergedLinear):
                if kind == "bias" and not any(f"{name}:{p}" in filled for p in module.part_offsets):
                    missing.append(name)  # bias optional per part only if the checkpoint has none at all
                elif kind == "weight":
                    missing += [f"{name}:{p}" for p in module.part_offsets if f"{name}:{p}" not in filled]
            elif name not in filled:
                missing.append(name)
        if missing:
            raise ModelFormatError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
