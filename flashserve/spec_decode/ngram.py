"""Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; vLLM's n-gram proposer): the
draft is what followed the most recent earlier occurrence of the sequence's last n tokens, in
prompt + output, trying n from prompt_lookup_max down to prompt_lookup_min. No model runs, so it
costs microseconds and pays off where the output copies its input (edits, summaries, code).

    tokens:  a b c d x y a b c   (n = 3: the suffix "a b c" occurred at 0)
    draft:   d x y ...           (up to k tokens after that occurrence)
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from flashserve.core.request import Request


def ngram_draft(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the last n tokens (largest n first)."""
    seq = np.asarray(tokens, dtype=np.int64)  # (L,)
    for n in range(min(n_max, len(seq) - 1), n_min - 1, -1):
        suffix = seq[-n:]
        # Windows starting at 0 .. L-n-1: every occurrence before the suffix itself.
        windows = sliding_window_view(seq[:-1], n)  # (L - n, n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return seq[start : start + k].tolist()
    return []


class NgramProposer:
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, requests: list[Request], num_drafts: dict[str, int]) -> dict[str, list[int]]:
        out = {}
        for r in requests:
            draft = ngram_draft(r.all_token_ids, num_drafts[r.request_id], self.n_min, self.n_max)
            if draft:
                out[r.request_id] = draft
        return out

    def draft_probs(self, request_id: str) -> None:
        """Drafts are chosen deterministically (greedy): verified as one-hot."""
        return None

    def free(self, request_ids) -> None:
        """Nothing to forget: drafts are read off the request's tokens each time."""
