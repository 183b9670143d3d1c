"""Draft-model speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a smaller model with
the target's vocabulary proposes k tokens greedily, and the target verifies them in its next step.

Greedy drafts are one-hot proposals, which rejection_sampler.py verifies exactly (draft probs None),
so sampling at temperature > 0 keeps the target's distribution; only the acceptance rate depends on
how often the target's samples agree with the draft's argmax.

The draft runs on the project's own pieces: a ModelRunner of its own over a paged KV cache of its
own, fed ScheduledRequests. Each request has a draft Request, whose tokens are those the target has
confirmed, for a KVCacheManager of the draft's own; the drafts fed after them are kept beside it, so
only confirmed tokens are ever hashed and prefix caching works for the draft too. Per propose() call:

  1. Roll back. After verification the draft's KV is valid up to the common prefix of what it fed
     and the request's tokens now; num_computed_tokens shrinks to it and blocks past it are freed.

         fed (KV cached):  t0 .. t9 d0 d1 d2      (k = 4: d3 was proposed but never fed)
         tokens now:       t0 .. t9 d0 d1 x       (the target accepted d0 d1, then chose x)
         kept:             t0 .. t9 d0 d1         (12 positions; x is computed next)

  2. Draft, batched over all requests, under the step's token budget: each round schedules every
     request's uncached tokens (x above; a whole prompt, in budget-sized chunks, for a new request)
     or its latest draft, and takes the argmax of its last row. k rounds after catching up, each
     request has its k drafts.

A request that finds the draft's pool full stops with the drafts it has; with none, its draft state
is dropped (its blocks go to the others) and the target decodes it as without speculation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashserve.config import EngineConfig
from flashserve.core.kv_cache_manager import KVCacheManager
from flashserve.core.request import Request
from flashserve.core.sched_output import ScheduledRequest, SchedulerOutput
from flashserve.model.loader import load_model
from flashserve.runner.kv_cache import allocate_kv_caches
from flashserve.runner.model_runner import ModelRunner
from flashserve.sample.guided import GuidedDecoding
from flashserve.sampling_params import SamplingParams
from flashserve.tokenizer.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


@dataclass
class _DraftSequence:
    source: Request  # the target's request (compared by identity: a reused request id starts afresh)
    # The draft's record for its KV cache manager: the target's tokens as of the last call (only
    # confirmed tokens are hashed for prefix reuse), num_computed_tokens counting fed drafts too.
    seq: Request
    tokens: list[int]  # what the draft computes: seq's tokens, then the drafts fed to it
    want: int = 0  # drafts to propose this call
    drafts: list[int] = field(default_factory=list)


class DraftModelProposer:
    def __init__(self, config: EngineConfig, num_blocks: int, device: torch.device, target_tokenizer: Tokenizer):
        """`num_blocks`: the draft's pool holds as many blocks as the target's (a request's draft holds at
        most k - 1 positions more than its target copy), in fewer bytes when the draft is smaller."""
        spec = config.speculative
        draft_tokenizer = Tokenizer.from_model_path(spec.draft_model_path)
        check_same_tokens(config.model, target_tokenizer, spec.model, draft_tokenizer)
        self.max_batch_tokens = config.scheduler.max_num_batched_tokens
        self.max_len = spec.draft_model_config.max_position_embeddings
        dtype = getattr(torch, config.dtype)
        model, mc = load_model(spec.draft_model_path, dtype=dtype, device=device, quantization=config.quantization,
                               activation_quant=config.activation_quant)
        cache = config.cache
        kv_caches = allocate_kv_caches(mc, num_blocks, cache.block_size, dtype, device, cache.kv_cache_dtype)
        eos = target_tokenizer.eos_token_ids
        self.runner = ModelRunner(model, kv_caches, cache.block_size, eos, device,
                                  GuidedDecoding(draft_tokenizer, eos),  # never asked: drafts are unconstrained
                                  decode_rows=spec.num_speculative_tokens + 1)  # a catch-up is at most k + 1 tokens
        self.kv_cache_manager = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.sequences: dict[str, _DraftSequence] = {}

    def draft_probs(self, request_id: str) -> None:
        """Drafts are chosen deterministically (greedy): verified as one-hot."""
        return None

    def free(self, request_ids) -> None:
        """Drop the draft state of requests that finished, were aborted or preempted."""
        for rid in request_ids:
            ds = self.sequences.pop(rid, None)
            if ds is not None:
                self.kv_cache_manager.free(ds.seq, ds.seq.num_computed_tokens)  # a failed pass wrote nothing

    def propose(self, requests: list[Request], num_drafts: dict[str, int]) -> dict[str, list[int]]:
        active = []
        try:
            for req in requests:
                ds = self._prepare(req, num_drafts[req.request_id])
                if ds is not None:
                    active.append(ds)
            self._draft(active)
        except Exception:
            # Half-done bookkeeping must not outlive the failure: these requests start afresh.
            self.free([r.request_id for r in requests])
            raise
        for ds in active:
            if not ds.drafts:  # the pool ran short before its first draft: give its blocks back
                self.free([ds.seq.request_id])
        return {ds.seq.request_id: ds.drafts for ds in active if ds.drafts}

    def _prepare(self, req: Request, want: int) -> _DraftSequence | None:
        """The request's draft state, rolled back to what its tokens confirm (new: with its prefix-cache
        hits), to propose `want` drafts or fewer; None when the draft's context has no room for a draft."""
        want = min(want, self.max_len - req.num_tokens)
        ds = self.sequences.get(req.request_id)
        if ds is not None and ds.source is not req:
            self.free([req.request_id])
            ds = None
        if want < 1:
            return None
        if ds is None:
            ds = _DraftSequence(req, Request(req.request_id, req.all_token_ids, GREEDY), list(req.all_token_ids))
            computed, num_cached = self.kv_cache_manager.get_computed_blocks(ds.seq)
            self.kv_cache_manager.allocate_slots(ds.seq, 0, computed)  # takes the hits before anything evicts them
            ds.seq.num_computed_tokens = num_cached
            self.sequences[req.request_id] = ds
        else:
            self._roll_back(ds)
        ds.want, ds.drafts = want, []
        return ds

    def _roll_back(self, ds: _DraftSequence) -> None:
        seq, n = ds.seq, ds.seq.num_tokens
        fed, confirmed = ds.tokens[n:], ds.source.all_token_ids[n:]
        agree = next((i for i, (a, b) in enumerate(zip(fed, confirmed)) if a != b), min(len(fed), len(confirmed)))
        # The last token is always computed again: its row gives the first draft.
        seq.num_computed_tokens = min(n + agree, seq.num_computed_tokens, n + len(confirmed) - 1)
        self.kv_cache_manager.trim(seq, seq.num_computed_tokens)
        del ds.tokens[n:]
        ds.tokens.extend(confirmed)
        seq.all_token_ids.extend(confirmed)

    def _draft(self, active: list[_DraftSequence]) -> None:
        """Forward passes over every sequence's next tokens until each has its drafts. Blocks are
        allocated per pass, as the scheduler does: only blocks a pass writes are hashed for reuse."""
        kvm = self.kv_cache_manager
        pending = list(active)
        while pending:
            budget, batch, scheduled = self.max_batch_tokens, [], []
            for ds in pending:
                seq = ds.seq
                n = min(len(ds.tokens) - seq.num_computed_tokens, budget)
                if n < 1:
                    break  # the budget is spent
                if kvm.allocate_slots(seq, n) is None:
                    ds.want = len(ds.drafts)  # the draft's pool is full: stop with the drafts it has
                    continue
                batch.append(ScheduledRequest(seq.request_id, ds.tokens, seq.num_computed_tokens, n,
                                              kvm.block_ids(seq.request_id), GREEDY, []))
                scheduled.append(ds)
                budget -= n
            out = self.runner.execute(SchedulerOutput(batch, blocks_to_copy=kvm.take_copies()))
            for ds, sr, sampled in zip(scheduled, batch, out.sampled_token_ids):
                ds.seq.num_computed_tokens += sr.num_scheduled_tokens
                if sampled:
                    ds.drafts.append(sampled[0])
                    if len(ds.drafts) < ds.want:  # fed next pass; the last draft never is
                        ds.tokens.append(sampled[0])
            pending = [ds for ds in pending if len(ds.drafts) < ds.want]
            if pending and not batch:  # a broken invariant must not spin forever
                raise RuntimeError("the draft model has drafts to make but nothing to compute")


def check_same_tokens(target_name: str, target: Tokenizer, draft_name: str, draft: Tokenizer) -> None:
    """A draft's token ids must mean the target's tokens; ValueError naming both models otherwise."""
    ours, theirs = target.backend.get_vocab(with_added_tokens=True), draft.backend.get_vocab(with_added_tokens=True)
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise ValueError(f"the draft model {draft_name} and the target {target_name} have different tokenizers "
                         f"({len(theirs)} and {len(ours)} tokens, {differ} token/id pairs not in both): "
                         "a draft must share the target's vocabulary")
