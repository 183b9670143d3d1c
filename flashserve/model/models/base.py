"""What every causal LM here shares: KV binding, logits, and loading HF-named weights
into fused projections (q|k|v → qkv_proj, gate|up → gate_up_proj)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flashserve.config import ModelConfig
from flashserve.errors import ModelFormatError
from flashserve.model.layers.attention import Attention
from flashserve.model.layers.embedding import VocabEmbedding
from flashserve.model.layers.linear import Linear, MergedLinear
from flashserve.quantization.gguf_blocks import GGUFTensor
from flashserve.quantization.gguf_method import pack_embedding, pack_linear
from flashserve.quantization.int4_format import Int4Groups

# Weights that arrive quantized: GGUF blocks, or a GPTQ/AWQ checkpoint's 4-bit linear
Quantized = GGUFTensor | Int4Groups

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

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (packed weights hold integer parameters, so ask a norm)."""
        return self.model.norm.weight.dtype

    def bind_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        if len(layers) != len(kv_caches):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(layers)} attention layers")
        for attn, cache in zip(layers, kv_caches):
            attn.kv_cache = cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """input_ids, positions: (T,) → hidden states (T, d) after the final norm."""
        return self.model(input_ids, positions, meta)

    def head_weight(self) -> nn.Module | None:
        """The packed weight the logits are computed with (the embedding's when they are tied), or None
        for a float head or a rank that holds no head."""
        head = getattr(self.model, "embed_tokens", None) if self.lm_head is None else self.lm_head
        return getattr(head, "qweight", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) → (N, vocab) float32."""
        head = self.model.embed_tokens.attend if self.lm_head is None else self.lm_head
        logits = head(hidden).float()
        cap = self.config.final_logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Hook for HF-checkpoint conventions that differ from our parameters (Gemma's norms)."""
        return tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Quantized]], hf_checkpoint: bool,
                     complete: bool = True) -> None:
        """Copy (HF-style name, tensor) pairs into the parameters; every parameter must be filled,
        unless `complete` is False (a part of the checkpoint: layer streaming loads one layer at a time).
        A quantized weight (GGUF blocks or a GPTQ/AWQ linear, when quantized execution is on) becomes
        a packed weight of the Linear or embedding it belongs to; merged parts are packed together at the end."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        dtype = self.dtype
        filled: set[str] = set()
        quantized_parts: dict[str, dict[str, Quantized]] = {}  # merged module → part → blocks
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
                if isinstance(tensor, Quantized) and kind == "weight":
                    _check_shape(name, (target.part_offsets[part][1], target.in_features), tensor.shape)
                    quantized_parts.setdefault(f"{parent}.{fused}", {})[part] = tensor
                else:
                    target.load_part(part, kind, _as_float(tensor))
                filled.add(f"{parent}.{fused}.{kind}:{part}")
                continue
            if isinstance(tensor, Quantized):
                if kind == "weight" and _load_quantized(modules.get(module_name), name, tensor, dtype):
                    tensor.release_pages()
                    filled.add(name)
                    continue
                tensor = _as_float(tensor)
            param = params.get(name)
            if param is None:
                raise ModelFormatError(f"checkpoint tensor {name!r} has no place in this model")
            _check_shape(name, tuple(param.shape), tuple(tensor.shape))
            param.data.copy_(tensor)
            filled.add(name)
        for module_name, parts in quantized_parts.items():
            target = modules[module_name]
            # Parts that came as floats join as dense rows (a part never loaded is reported below).
            ordered = [parts[p] if p in parts else target.part_weight(p) for p in target.part_offsets]
            packed = pack_linear(ordered, dtype)
            if packed is None:  # no quantized kernel for these types
                for part, t in parts.items():
                    target.load_part(part, "weight", _as_float(t))
            else:
                target.set_quantized(packed)
            for t in parts.values():
                t.release_pages()
        if complete:
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


def _as_float(tensor: torch.Tensor | Quantized) -> torch.Tensor:
    return torch.from_numpy(tensor.dequantize()) if isinstance(tensor, Quantized) else tensor


def _check_shape(name: str, expected: tuple, got: tuple) -> None:
    if tuple(expected) != tuple(got):
        raise ModelFormatError(f"{name}: expected shape {tuple(expected)}, file has {tuple(got)}")


def _load_quantized(module, name: str, tensor: Quantized, dtype: torch.dtype) -> bool:
    """Pack `tensor` into `module` if it is a Linear or the embedding; False if it stays a float weight."""
    if isinstance(module, VocabEmbedding) and isinstance(tensor, GGUFTensor):
        _check_shape(name, (module.num_embeddings, module.embedding_dim), tensor.shape)
        module.set_quantized(pack_embedding(tensor))
        return True
    if isinstance(module, Linear):
        _check_shape(name, (module.out_features, module.in_features), tensor.shape)
        packed = pack_linear([tensor], dtype)
        if packed is not None:
            module.set_quantized(packed)
            return True
    return False
