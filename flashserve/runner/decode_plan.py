"""Decode steps run layer after layer in C++ (kernels/csrc/decode_plan.cpp), for Llama-family
(Llama, Mistral, SmolLM2, Qwen2) and Gemma 3 models.

A single-stream decode step of SmolLM2-135M spent about 8 of its 26 ms in Python and torch
dispatch (~15 module and op calls per layer, 30 layers), measured in benchmarks/RESULTS.md. The
plan holds the same weights, caches and kernel choices as the modules and calls the same C++
kernels in the same order, so its hidden states equal the module path's bit for bit; it only
removes the per-call overhead. It applies to decode steps (with or without drafts to verify) on
the CPU, float32, with float or group-quantized weights (GroupQuantWeight) and fewer rows than any
packed weight's large_m (where the modules would switch to dequantize + GEMM; with int8 activations
they never do); anything else runs through the modules. The runner owns it: the model's forward stays the modules'.
"""
from __future__ import annotations

import torch

from flashserve.attention.decode import SPLIT_TOKENS
from flashserve.attention.kv_quant import is_int8
from flashserve.attention.metadata import AttentionMetadata
from flashserve.kernels import ops
from flashserve.model.layers.linear import Linear
from flashserve.model.models.gemma3 import Gemma3DecoderLayer
from flashserve.model.models.llama import GatedMLP, LlamaDecoderLayer
from flashserve.quantization.codebook_weight import CodebookWeight
from flashserve.quantization.group_quant_weight import GroupQuantWeight
from flashserve.quantization.packed import stacked_parts

_GELU_ACTS = ("gelu_pytorch_tanh", "gelu")
_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float32 compute's cache, or a 2-byte one
# Decoder-layer classes the C++ plan reproduces → their norms, in the order add_layer takes them.
# Two entries: pre-norm blocks with fused residual adds; four-norm "sandwich" blocks with q/k norms.
_LAYER_NORMS = {
    LlamaDecoderLayer: ("input_layernorm", "post_attention_layernorm"),
    Gemma3DecoderLayer: ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm",
                         "pre_feedforward_layernorm", "post_feedforward_layernorm"),
}


class DecodePlan:
    def __init__(self, plan, max_rows: int, model):
        self._plan = plan
        self.max_rows = max_rows
        self._model = model

    def applies(self, meta: AttentionMetadata, num_tokens: int, only_decodes: bool) -> bool:
        """Pure decode steps, and steps the runner asks to run as decode rows (`only_decodes`: every
        request samples after one token plus its drafts, or, in a draft model's runner, after a few
        new tokens: ModelRunner.decode_rows), with fewer rows than max_rows."""
        return (meta.is_pure_decode or only_decodes) and num_tokens < self.max_rows

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) → (T, d) hidden states after the final norm, as model(...) gives.

        A request verifying k drafts has k + 1 rows at consecutive positions. Each row becomes a decode
        query of its own: the request's block table, and a length of its position + 1. Every layer
        writes all rows' K/V before its attention reads, so a row sees the drafts before it and not
        those after: causal attention, and the very computation a plain decode step at that position
        makes (same kernel, same keys, same split), so greedy tokens cannot differ from plain decoding."""
        inner = self._model.model
        seq_lens, block_table = meta.seq_lens, meta.block_table
        if not meta.is_pure_decode:
            seq_lens = (positions + 1).to(torch.int32)  # (T,)
            rows = torch.tensor(meta.query_lens_cpu, device=block_table.device)
            block_table = block_table.repeat_interleave(rows, dim=0)  # (T, max_blocks)
        return self._plan.forward(inner.embed(input_ids), positions, meta.slot_mapping, block_table, seq_lens,
                                  inner.norm.weight)


def build_decode_plan(model) -> DecodePlan | None:
    """The plan for `model` (caches bound), or None when some part of it needs the modules."""
    kernels = ops.native()
    cfg = model.config
    layers = model.model.layers
    kinds = {type(layer) for layer in layers}
    if (kernels is None or len(kinds) != 1 or next(iter(kinds)) not in _LAYER_NORMS
            or any(type(layer.mlp) is not GatedMLP for layer in layers)  # e.g. hot/cold neurons with skipping
            or model.dtype != torch.float32 or model.model.norm.weight.device.type != "cpu"):
        return None
    norm_names = _LAYER_NORMS[next(iter(kinds))]
    linears = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                               layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if not all(_supported(m) for m in linears):
        return None
    for layer in layers:
        caches = layer.self_attn.kv_cache
        if caches is None or any(is_int8(c) or c.dtype not in _CACHE_DTYPES for c in caches) \
                or caches[1].stride(3) != 1:  # the kernels read V's rows whole
            return None
    first = layers[0].self_attn
    plan = kernels.DecodePlan(first.num_heads, first.num_kv_heads, first.head_dim, cfg.rms_norm_eps, first.scale,
                              first.logit_softcap or 0.0, cfg.hidden_act in _GELU_ACTS, len(norm_names) > 2,
                              SPLIT_TOKENS)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        norms = [layer.get_submodule(name).weight for name in norm_names]
        plan.add_layer(norms, _linear(attn.qkv_proj), _linear(attn.o_proj), _linear(mlp.gate_up_proj),
                       _linear(mlp.down_proj), *attn.kv_cache, attn.rotary.cos, attn.rotary.sin,
                       attn.sliding_window or -1)
    packed = [w.large_m for m in linears if m.qweight is not None for w in _packed_parts(m)]
    return DecodePlan(plan, min(packed, default=1 << 30), model)


def _packed_parts(m: Linear) -> list[GroupQuantWeight | CodebookWeight] | None:
    """The GroupQuantWeights (or codebook weights in tiles) m multiplies with, stacked along its output rows;
    None for other forms."""
    parts = stacked_parts(m.qweight)
    planned = all(type(p) is GroupQuantWeight or (type(p) is CodebookWeight and p.tiled) for p in parts)
    return parts if planned else None


def _supported(m: Linear) -> bool:
    if m.qweight is None:
        return m.weight.dtype == torch.float32
    return _packed_parts(m) is not None


def _linear(m: Linear) -> tuple:
    """(weight, bias, parts) as the C++ plan takes them (GroupQuantWeight.plan_part): a float weight and
    no parts, or no weight and the packed parts."""
    if m.qweight is None:
        return m.weight, m.bias, []
    return None, m.bias, [w.plan_part() for w in _packed_parts(m)]
