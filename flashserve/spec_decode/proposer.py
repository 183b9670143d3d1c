"""The proposer interface of speculative decoding, and the one place that builds a proposer.

Owned by the engine: after each step it hands the proposer the requests that decode next
(Scheduler.spec_candidates) and stores what comes back (Scheduler.set_spec_tokens). A proposer
only reads a request's tokens and parameters; it may propose fewer than k tokens, or none.
The drafts are verified by the target in the next step (runner + rejection_sampler.py), so a
proposer can change speed, never the output distribution.
"""
from __future__ import annotations

from typing import Protocol

from flashserve.config import SpeculativeConfig
from flashserve.core.request import Request


class Proposer(Protocol):
    def propose(self, requests: list[Request]) -> dict[str, list[int]]:
        """Up to k draft token ids per request id (requests left out get none)."""
        ...


def make_proposer(config: SpeculativeConfig) -> Proposer | None:
    if config.method is None:
        return None
    if config.method == "ngram":
        from flashserve.spec_decode.ngram import NgramProposer

        return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    raise ValueError(f"speculative method {config.method!r} is not available")
