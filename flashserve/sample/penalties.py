"""Repetition, presence and frequency penalties and logit bias, batched over rows.

Repetition penalty: CTRL (Keskar et al. 2019): a seen token's logit is divided by r when
positive and multiplied by r when negative; "seen" = in the prompt or the output.
Presence/frequency: OpenAI's definition over generated tokens:
    logit -= presence * (count > 0) + frequency * count
"""
from __future__ import annotations

import torch


def token_counts(token_lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    """(rows, vocab) int32 occurrence counts of each row's tokens."""
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.int32, device=device)
    lengths = [len(t) for t in token_lists]
    if sum(lengths):
        rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device),
                                       torch.tensor(lengths, device=device))
        cols = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.int64, device=device)
        counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.int32), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits (rows, vocab) float32; prompt_mask bool (rows, vocab); output_counts int (rows, vocab);
    per-row repetition/presence/frequency (rows,). Returns new logits."""
    seen = prompt_mask | (output_counts > 0)
    r = repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalized, logits)
    return logits - presence.unsqueeze(1) * (output_counts > 0) - frequency.unsqueeze(1) * output_counts
