"""Token embedding, which is also the output projection of models with tied embeddings.

The table is a float (vocab, d) weight, or, for quantized checkpoints, an Int8Weight whose
rows are looked up and dequantized per token and whose int8 kernel computes the tied logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = vocab_size, dim
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
        self.qweight: nn.Module | None = None  # an Int8Weight (rows(), forward()) when packed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) → (T, d) in the compute dtype."""
        if self.qweight is None:
            return F.embedding(input_ids, self.weight)
        return self.qweight.rows(input_ids, self.dtype)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: (N, d) → (N, vocab) in the compute dtype."""
        return F.linear(hidden, self.weight) if self.qweight is None else self.qweight(hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype if self.qweight is not None else self.weight.dtype

    def set_quantized(self, qweight: nn.Module) -> None:
        if (qweight.out_features, qweight.in_features) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"packed embedding is {qweight.out_features}x{qweight.in_features}")
        self._dtype = self.weight.dtype
        self.weight = None
        self.qweight = qweight
