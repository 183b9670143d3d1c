"""Decode steps of Llama-family models run layer after layer in C++ (attention/csrc/decode_plan.cpp).

A single-stream decode step of SmolLM2-135M spent about 8 of its 26 ms in Python and torch
dispatch (~15 module and op calls per layer, 30 layers), measured in benchmarks/RESULTS.md. The
plan holds the same weights, caches and kernel choices as the modules and calls the same C++
kernels in the same order, so its hidden states equal the module path's bit for bit; it only
removes the per-call overhead. It applies to pure decode steps on the CPU, float32, with float or
group-quantized weights (GroupQuantWeight) and fewer rows than any packed weight's large_m (where
the modules would switch to dequantize + GEMM; with int8 activations they never do); anything else
runs through the modules.
"""
from __future__ import annotations

import torch

from flashserve.attention.cpu_kernels import cpu_kernels
from flashserve.attention.decode import SPLIT_TOKENS
from flashserve.attention.metadata import AttentionMetadata
from flashserve.model.layers.linear import Linear
from flashserve.quantization.packed import GroupQuantWeight

_GELU_ACTS = ("gelu_pytorch_tanh", "gelu")
_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float32 compute's cache, or a 2-byte one


class DecodePlan:
    def __init__(self, plan, max_rows: int, final_norm: torch.Tensor):
        self._plan = plan
        self.max_rows = max_rows
        self._final_norm = final_norm

    def applies(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return meta.is_pure_decode and num_tokens < self.max_rows

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x: (T, d) embedded tokens → (T, d) hidden states after the final norm."""
        return self._plan.forward(x, positions, meta.slot_mapping, meta.block_table, meta.seq_lens,
                                  self._final_norm)


def build_decode_plan(model) -> DecodePlan | None:
    """The plan for `model` (caches bound), or None when some part of it needs the modules."""
    from flashserve.model.models.llama import LlamaForCausalLM, LlamaModel

    kernels = cpu_kernels()
    cfg = model.config
    if (kernels is None or type(model) is not LlamaForCausalLM or type(model.model) is not LlamaModel
            or model.dtype != torch.float32 or model.model.norm.weight.device.type != "cpu"
            or cfg.attn_logit_softcap):
        return None
    layers = model.model.layers
    linears = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                               layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if not all(_supported(m) for m in linears):
        return None
    for layer in layers:
        attn = layer.self_attn
        if attn.kv_cache is None or any(type(c) is not torch.Tensor or c.dtype not in _CACHE_DTYPES
                                        or not c.is_contiguous() for c in attn.kv_cache):
            return None
        if attn.q_norm is not None or attn.rotary is not layers[0].self_attn.rotary:
            return None
    first = layers[0].self_attn
    plan = kernels.DecodePlan(first.num_heads, first.num_kv_heads, first.head_dim, cfg.rms_norm_eps, first.scale,
                              first.rotary.cos, first.rotary.sin, cfg.hidden_act in _GELU_ACTS, SPLIT_TOKENS)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        plan.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                       _linear(attn.qkv_proj), _linear(attn.o_proj), _linear(mlp.gate_up_proj),
                       _linear(mlp.down_proj), *attn.kv_cache, attn.sliding_window or -1)
    packed = [m.qweight.large_m for m in linears if m.qweight is not None]
    return DecodePlan(plan, min(packed, default=1 << 30), model.model.norm.weight)


def _supported(m: Linear) -> bool:
    if m.qweight is None:
        return m.weight.dtype == torch.float32
    return type(m.qweight) is GroupQuantWeight


def _linear(m: Linear) -> tuple:
    """(codes, scale, zero, weight, bias, bits, group, int8_activations) as the C++ plan takes them."""
    w = m.qweight
    if w is None:
        return None, None, None, m.weight, m.bias, 0, 0, False
    return w.codes, w.scale, w.zero, None, m.bias, w.bits, w.group, w.int8_activations
