"""Model runner: the only place that builds tensors.

SchedulerOutput → ModelInputs → model forward → logits of the rows to sample → sampler → RunnerOutput.
A step with draft tokens scores every draft position in the same forward pass and hands those rows
to the rejection sampler (spec_decode/rejection_sampler.py) instead.
It keeps no scheduling policy; per-request state is limited to seeded generators and the
grammar matchers of guided decoding (sample/guided.py), both dropped when a request finishes.
"""
from __future__ import annotations

import torch

from flashserve.config import TypicalAcceptance
from flashserve.core.sched_output import HiddenRows, PromptLogprobs, RunnerOutput, SchedulerOutput
from flashserve.runner.decode_plan import build_decode_plan
from flashserve.runner.input_batch import build_model_inputs
from flashserve.runner.kv_swap import copy_kv_blocks
from flashserve.sample.guided import GuidedDecoding
from flashserve.sample.sampler import Sampler, SamplerOutput, SamplingMetadata, target_logprobs
from flashserve.spec_decode.rejection_sampler import rejection_sample

PROMPT_LOGPROBS_ROWS = 256  # logits rows per slice: (256, vocab) float32 stays a few tens of MiB


class ModelRunner:
    def __init__(self, model, kv_caches, block_size: int, eos_token_ids: tuple[int, ...], device: torch.device,
                 guided: GuidedDecoding, use_decode_plan: bool = True, swap_caches=(),
                 typical_acceptance: TypicalAcceptance | None = None, decode_rows: int = 1):
        """`swap_caches`: the host swap space laid out like kv_caches (runner/kv_swap.py), or none;
        `typical_acceptance`: verify drafts of sampling requests by Medusa's typical acceptance, not
        lossless rejection sampling (SpeculativeConfig.typical_acceptance);
        `decode_rows`: a step whose every request samples after at most this many new tokens (drafts
        aside) runs as decode rows (runner/decode_plan.py). 1 for a model whose outputs are the
        engine's; a draft model's catch-up of 2 or more confirmed tokens is short and its numbers are
        only proposals, so it takes more (a prompt chunk's path costs more per step at a few rows)."""
        self.model = model
        self.typical_acceptance = typical_acceptance
        # Hand back each request's last hidden states (RunnerOutput.hidden_states): set by make_proposer
        # for a proposer drafting from them (Medusa, EAGLE); off, a step costs nothing more.
        self.expose_hidden_states = False
        self.kv_caches = kv_caches
        self.swap_caches = swap_caches
        self.model.bind_kv_caches(kv_caches)
        # Pure decode steps run as one C++ call where the model allows (runner/decode_plan.py).
        self.decode_plan = build_decode_plan(model) if use_decode_plan else None
        self.decode_rows = decode_rows
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.sampler = Sampler()
        # Seeded requests draw from their own generator so their tokens do not depend on the batch.
        self.generators: dict[str, torch.Generator] = {}
        self.guided = guided

    def _generator_for(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[request_id] = gen
        return gen

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for rid in sched.finished_request_ids:
            self.generators.pop(rid, None)
        self.guided.free(sched.finished_request_ids)
        # Block copies before the forward, in the order core/scheduler.py explains.
        copy_kv_blocks(self.kv_caches, self.swap_caches, sched.blocks_to_swap_out)
        copy_kv_blocks(self.kv_caches, self.kv_caches, sched.blocks_to_copy)  # copy-on-write of shared blocks
        copy_kv_blocks(self.swap_caches, self.kv_caches, sched.blocks_to_swap_in)
        scheduled = sched.scheduled
        request_ids = [r.request_id for r in scheduled]
        sampled_ids: list[list[int]] = [[] for _ in scheduled]
        logprobs: list = [None] * len(scheduled)
        if not scheduled:
            return RunnerOutput(request_ids, sampled_ids, logprobs)

        inputs = build_model_inputs(scheduled, self.block_size, self.device)
        only_decodes = all(r.samples_this_step and r.num_scheduled_tokens - len(r.spec_token_ids) <= self.decode_rows
                           for r in scheduled)
        hidden = self._forward(inputs.input_ids, inputs.positions, inputs.attn_metadata, only_decodes)  # (T, d)
        prompt_lps = self._prompt_logprobs(scheduled, hidden, inputs.attn_metadata.query_start_loc_cpu)
        out = RunnerOutput(request_ids, sampled_ids, logprobs, prompt_lps)
        if inputs.sampled_requests:
            self._sample(hidden, inputs, scheduled, out)
        if self.expose_hidden_states:
            out.hidden_states = kept_hidden_rows(hidden, scheduled, sampled_ids,
                                                 inputs.attn_metadata.query_start_loc_cpu)
        return out

    def _sample(self, hidden: torch.Tensor, inputs, scheduled, out: RunnerOutput) -> None:
        """Fill out.sampled_token_ids (and logprobs) of the requests that reach their last token."""
        sampled_ids, logprobs = out.sampled_token_ids, out.logprobs
        logits = self.model.compute_logits(hidden[inputs.sample_indices])  # (num_rows, vocab) float32
        rows = [scheduled[i] for i in inputs.sampled_requests]
        if any(r.spec_token_ids for r in rows):
            tokens_of, lps_of = self._verify(logits, rows)
            for j, i in enumerate(inputs.sampled_requests):
                sampled_ids[i], logprobs[i] = tokens_of[j], lps_of[j]
            return
        metadata = SamplingMetadata.build(
            params=[r.sampling_params for r in rows],
            output_token_ids=[r.output_token_ids for r in rows],
            prompt_token_ids=[r.token_ids[: len(r.token_ids) - len(r.output_token_ids)] for r in rows],
            generators=[self._generator_for(r.request_id, r.sampling_params.seed) for r in rows],
            eos_token_ids=self.eos_token_ids,
            device=self.device,
            grammar=self.guided.masks(rows, logits.shape[1]),
        )
        out = self.sampler(logits, metadata)
        tokens = out.sampled_token_ids.tolist()  # the one host sync of the step
        lps = out.format_logprobs() if out.has_logprobs else None
        for row, i in enumerate(inputs.sampled_requests):
            sampled_ids[i] = [tokens[row]]
            if lps is not None and lps[row] is not None:
                logprobs[i] = [lps[row]]

    def _verify(self, logits: torch.Tensor, rows) -> tuple[list[list[int]], list]:
        """Speculative steps: request r has k_r + 1 logits rows (k_r drafts, maybe 0). Row j of r
        samples as plain decoding would after r's output plus its first j drafts (penalties and
        min_tokens see those); the rejection sampler keeps or replaces the drafts."""
        expanded = [(r, j) for r in rows for j in range(len(r.spec_token_ids) + 1)]
        metadata = SamplingMetadata.build(
            params=[r.sampling_params for r, _ in expanded],
            output_token_ids=[r.output_token_ids + r.spec_token_ids[:j] for r, j in expanded],
            prompt_token_ids=[r.token_ids[: len(r.token_ids) - len(r.output_token_ids)] for r, _ in expanded],
            generators=[None] * len(expanded),  # rejection_sample draws per request
            eos_token_ids=self.eos_token_ids,
            device=self.device,
            grammar=self.guided.masks([r for r, _ in expanded], logits.shape[1]),  # guided rows carry no drafts
        )
        q = [None if r.spec_token_probs is None else r.spec_token_probs[: len(r.spec_token_ids)] for r in rows]
        out = rejection_sample(logits, metadata, [r.spec_token_ids for r in rows], q,
                               [self._generator_for(r.request_id, r.sampling_params.seed) for r in rows],
                               self.typical_acceptance)
        lps_of: list = [None] * len(rows)
        if out.logprobs is not None:  # the logprobs of the emitted tokens under the target
            starts = [0]
            for r in rows[:-1]:
                starts.append(starts[-1] + len(r.spec_token_ids) + 1)
            emitted_rows = [s + j for s, t in zip(starts, out.token_ids) for j in range(len(t))]
            emitted = torch.tensor([tok for t in out.token_ids for tok in t], dtype=torch.int64, device=self.device)
            num = [metadata.num_logprobs[row] for row in emitted_rows]
            flat = SamplerOutput(emitted, out.logprobs[emitted_rows], num).format_logprobs()
            pos = 0
            for j, (r, t) in enumerate(zip(rows, out.token_ids)):
                if r.sampling_params.logprobs is not None:
                    lps_of[j] = flat[pos : pos + len(t)]
                pos += len(t)
        return out.token_ids, lps_of

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, only_decodes: bool) -> torch.Tensor:
        plan = self.decode_plan
        if plan is not None and plan.applies(meta, len(input_ids), only_decodes):
            return plan(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)

    def _prompt_logprobs(self, scheduled, hidden: torch.Tensor, starts: list[int]) -> list | None:
        """For requests asking prompt_logprobs: the hidden row of position p gives the logprob of
        prompt token p + 1. Only prompt positions computed this step, and only until the first
        output token exists (a recompute after preemption has already reported them)."""
        out = None
        for i, r in enumerate(scheduled):
            k = r.sampling_params.prompt_logprobs
            if k is None or r.output_token_ids:
                continue
            num_prompt = len(r.token_ids)
            first, stop = r.num_computed_tokens, min(r.num_computed_tokens + r.num_scheduled_tokens, num_prompt - 1)
            if stop <= first:
                continue
            rows = hidden[starts[i] : starts[i] + stop - first]  # (stop - first, d)
            targets = torch.tensor(r.token_ids[first + 1 : stop + 1], dtype=torch.int64, device=self.device)
            chunk = PromptLogprobs(first + 1, [], [], [])
            for lo in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
                sl = slice(lo, lo + PROMPT_LOGPROBS_ROWS)
                lps, ranks, top = target_logprobs(self.model.compute_logits(rows[sl]), targets[sl], k)
                chunk.token_logprobs += lps
                chunk.token_ranks += ranks
                chunk.top += top
            out = out or [None] * len(scheduled)
            out[i] = chunk
        return out


def kept_hidden_rows(hidden: torch.Tensor, scheduled, sampled_ids: list[list[int]], starts: list[int]
                     ) -> list[HiddenRows]:
    """Per request, the rows of `hidden` (T, d) whose positions stay in its sequence: all it computed,
    less the rows of rejected drafts (k drafts, a accepted: k + 1 rows scored, a + 1 kept)."""
    out = []
    for i, r in enumerate(scheduled):
        k = len(r.spec_token_ids)
        kept = r.num_scheduled_tokens - k + (len(sampled_ids[i]) - 1 if k else 0)
        out.append(HiddenRows(r.num_computed_tokens, hidden[starts[i] : starts[i] + kept]))
    return out
