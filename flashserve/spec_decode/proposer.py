"""The proposer interface of speculative decoding, and the one place that builds a proposer.

Owned by the engine: after each step it hands the proposer the requests that decode next
(Scheduler.spec_candidates), each with its own number of drafts (draft_length.py), and stores
what comes back (Scheduler.set_spec_tokens). A proposer only reads a request's tokens and
parameters; it may propose fewer tokens than asked, or none.
The drafts are verified by the target in the next step (runner + rejection_sampler.py), so a
proposer can change speed, never the output distribution.
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch

from flashserve.config import EngineConfig
from flashserve.core.request import Request
from flashserve.core.sched_output import HiddenRows

logger = logging.getLogger(__name__)


class Proposer(Protocol):
    def propose(self, requests: list[Request], num_drafts: dict[str, int]) -> dict[str, list[int]]:
        """Up to num_drafts[request id] (>= 1) draft token ids per request id (requests left out get none)."""
        ...

    def draft_probs(self, request_id: str) -> torch.Tensor | None:
        """The distribution q (k, vocab) the request's latest drafts were sampled from, for the rejection
        sampler; None when they were chosen deterministically (verified as one-hot q)."""
        ...

    def free(self, request_ids) -> None:
        """Forget per-request state of requests that finished, were aborted or preempted."""
        ...


class HiddenStateProposer(Proposer, Protocol):
    """A proposer drafting from the target's last hidden states (SpeculativeConfig.uses_target_hidden_states):
    after every step the engine hands it the rows each running request kept (RunnerOutput.hidden_states)."""

    def observe(self, hidden: list[tuple[Request, HiddenRows]]) -> None:
        ...


def make_proposer(config: EngineConfig, num_blocks: int, device: torch.device, tokenizer, runner
                  ) -> Proposer | None:
    """`num_blocks` and `tokenizer`: the target's KV pool size and tokenizer (a draft model sizes its
    own pool from the first and must share the second); `runner`: the target's in-process ModelRunner,
    whose model's LM head (and embedding) Medusa and EAGLE heads share, and which then hands back
    hidden states (None when the model runs in worker processes)."""
    spec = config.speculative
    if spec.method is None:
        return None
    if spec.uses_target_hidden_states:
        if runner is None:
            raise ValueError(f"speculative method {spec.method!r} drafts from the target's hidden states, "
                             "which only an in-process model hands over: use tensor_parallel_size=1")
        runner.expose_hidden_states = True
    if spec.method == "ngram":
        from flashserve.spec_decode.ngram import NgramProposer

        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    if spec.method == "draft_model":
        from flashserve.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(config, num_blocks, device, tokenizer)
    if spec.method == "medusa":
        from flashserve.spec_decode.medusa import MedusaProposer

        return MedusaProposer(config, runner.model, device)
    if spec.method == "eagle":
        from flashserve.spec_decode.eagle import EagleProposer

        return EagleProposer(config, runner.model, device)
    raise ValueError(f"speculative method {spec.method!r} is not available")


def propose_isolating_failures(proposer: Proposer, requests: list[Request], num_drafts: dict[str, int]
                               ) -> tuple[dict[str, list[int]], list[str]]:
    """(drafts, ids of the requests whose proposal raised). When the batch raises, each request is
    tried alone, so that only those failing on their own are failed and the others keep drafting."""
    try:
        return proposer.propose(requests, num_drafts), []
    except Exception:
        logger.exception("proposer failed on a batch of %d requests; trying each alone", len(requests))
    drafts, failed = {}, []
    for r in requests:
        try:
            drafts.update(proposer.propose([r], num_drafts))
        except Exception:
            logger.exception("proposer failed for request %s; it ends with an error", r.request_id)
            failed.append(r.request_id)
    return drafts, failed
