"""What one token costs on a GGUF model, read from the file alone (so every engine is judged by
the same count): weights multiplied, bytes those weights take, KV bytes read and FLOPs.

    decode step of c sequences at context L:  bytes = weight bytes + c × kv_bytes_per_token(L)
                                              FLOPs = c × flops_per_token(L)
    prefill of P tokens:                      FLOPs = prefill_flops(P)
"""
from __future__ import annotations

from dataclasses import dataclass

from flashserve.config import ModelConfig


@dataclass(frozen=True)
class ModelFacts:
    cfg: ModelConfig
    params: int  # every weight in the file (embedding, norms, ...)
    matmul_params: int  # weights multiplied per token: all 2-D tensors but the embedding lookup, LM head included
    matmul_gguf_bytes: int  # bytes of those weights as the file stores them (llama.cpp reads these)
    weight_types: str  # e.g. "Q4_1 ×210, Q8_0 ×1"

    @classmethod
    def from_gguf(cls, path: str) -> "ModelFacts":
        from flashserve.model.loader import load_model_config
        from flashserve.model.loader.gguf_file import open_gguf

        tensors = open_gguf(path).tensors
        tied = not any(t.name == "output.weight" for t in tensors)
        mats = [t for t in tensors if len(t.shape) == 2 and (tied or t.name != "token_embd.weight")]
        types: dict[str, int] = {}
        for t in mats:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        return cls(
            cfg=load_model_config(path),
            params=sum(int(t.n_elements) for t in tensors),
            matmul_params=sum(int(t.n_elements) for t in mats),
            matmul_gguf_bytes=sum(int(t.n_bytes) for t in mats),
            weight_types=", ".join(f"{k} ×{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1])),
        )

    def _attended(self, context: float) -> float:
        """Key positions attended per query token at `context`, summed over layers (sliding windows cut it)."""
        c = self.cfg
        return sum(min(context, c.sliding_window_of(i) or context) for i in range(c.num_layers))

    def kv_bytes_per_token(self, context: float, elem_bytes: float) -> float:
        """K and V bytes one decoding sequence reads per step at `context` tokens."""
        return self._attended(context) * 2 * self.cfg.num_kv_heads * self.cfg.head_dim * elem_bytes

    def flops_per_token(self, context: float) -> float:
        """2 × multiplied weights, plus attention (QKᵀ and PV: 4 × heads × head_dim per key)."""
        c = self.cfg
        return 2 * self.matmul_params + 4 * c.num_heads * c.head_dim * self._attended(context)

    def prefill_flops(self, n: int) -> float:
        """A prompt of n tokens with logits for the last one only (what all three engines compute)."""
        c = self.cfg
        lm_head = c.vocab_size * c.hidden_size
        attention = sum(4 * c.num_heads * c.head_dim * self._attended(i + 1) for i in range(n))
        return 2 * (self.matmul_params - lm_head) * n + 2 * lm_head + attention


def decode_roofline(facts: ModelFacts, ceil: dict, tok_s: float, seqs: int, context: float,
                    weight_bytes: float, kv_elem_bytes: float) -> str:
    """Achieved GB/s and GFLOP/s of decoding `seqs` sequences at `tok_s`, with % of the measured peaks."""
    step_bytes = weight_bytes + seqs * facts.kv_bytes_per_token(context, kv_elem_bytes)
    gbs = tok_s / seqs * step_bytes / 1e9
    gflops = tok_s * facts.flops_per_token(context) / 1e9
    return f"{gbs:.1f} GB/s ({100 * gbs / ceil['mem_GBps']:.0f}%), {_gflops(gflops, ceil)}"


def prefill_roofline(facts: ModelFacts, ceil: dict, tok_s: float, n: int) -> str:
    return _gflops(tok_s * facts.prefill_flops(n) / n / 1e9, ceil)


def peak_gflops(ceil: dict) -> float:
    return max(ceil["bf16_GFLOPs"], ceil["fp32_GFLOPs"])


def _gflops(gflops: float, ceil: dict) -> str:
    return f"{gflops:.0f} GFLOP/s ({100 * gflops / peak_gflops(ceil):.0f}%)"
