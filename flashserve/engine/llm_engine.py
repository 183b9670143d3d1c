"""LLMEngine: add_request / abort_request / step().

step() is schedule → execute → update, then detokenize, then (speculative decoding) propose the
next step's draft tokens; a request whose proposal fails ends with an error, the others go on.
Under pipeline parallelism step() keeps config.steps_in_flight steps submitted, each over its own
micro-batch of requests (core/scheduler.py), and finishes the oldest: while the last stage runs one
micro-batch, the first runs the next.
Data flows one way: Scheduler → SchedulerOutput → Executor (ModelRunner in-process or on each
tensor-parallel worker) → RunnerOutput → Scheduler/OutputProcessor.
"""
from __future__ import annotations

import gc
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from flashserve import startup_phases
from flashserve.config import EngineConfig
from flashserve.core.request import RequestStatus
from flashserve.core.scheduler import Scheduler, SchedulerStats
from flashserve.distributed.executors import make_executor
from flashserve.engine.arg_utils import DEFAULT_KV_CACHE_CAP, EngineArgs
from flashserve.engine.input_processor import InputProcessor, PromptType
from flashserve.engine.output_processor import OutputProcessor
from flashserve.errors import InvalidRequestError
from flashserve.outputs import RequestOutput
from flashserve.core.swap_space import min_tokens_per_swapped_block
from flashserve.runner.kv_cache import kv_bytes_per_block, num_blocks_for_budget
from flashserve.runner.kv_swap import num_swap_slots
from flashserve.sample.guided import GuidedDecoding
from flashserve.spec_decode.draft_length import DraftLength, estimate_draft_cost
from flashserve.spec_decode.proposer import make_proposer, propose_isolating_failures
from flashserve.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    request_id: str
    prompt: str | None
    requests: list
    params: object


@dataclass
class EngineStats(SchedulerStats):
    """The scheduler's stats and the KV cache's bytes: reserved at start (virtual memory, the OS
    backs a page when it is first written) and touched, the blocks ever handed out times the bytes
    of a block (what of the reservation has been written, an estimate of its resident part)."""

    kv_cache_bytes_reserved: int
    kv_cache_bytes_touched: int
    spec_propose_seconds_total: float = 0.0  # wall time the proposer spent drafting since start
    tokens_sampled_total: int = 0  # tokens the model sampled since start, aborted requests' included


class LLMEngine:
    def __init__(self, config: EngineConfig, device: str = "cpu", tokenizer: Tokenizer | None = None):
        """`tokenizer`: the model's, when the caller already built it (the CLI sizes the KV pool of a
        one-shot generate from the prompt's length before it builds the engine)."""
        config.validate()
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.device = torch.device(device)
        dtype = getattr(torch, config.dtype)
        mc = config.model_config

        self.tokenizer = tokenizer or Tokenizer.from_model_path(config.model_path)
        self.eos_token_ids = tuple(dict.fromkeys((*mc.eos_token_ids, *self.tokenizer.eos_token_ids)))
        sc = config.scheduler
        self.num_blocks = num_blocks_for_budget(
            mc, config.cache, dtype, sc.max_num_seqs * sc.max_model_len + config.cache.block_size, DEFAULT_KV_CACHE_CAP
        )
        self.kv_block_bytes = kv_bytes_per_block(mc, config.cache.block_size, dtype, config.cache.kv_cache_dtype)
        self.guided = GuidedDecoding(self.tokenizer, self.eos_token_ids)
        # The model runs in this process or in one worker per tensor-parallel rank (distributed/).
        self.executor = make_executor(config, self.num_blocks, self.device, self.tokenizer, self.guided,
                                      self.eos_token_ids)
        self.runner = self.executor.runner  # None when workers hold the model
        self.scheduler = Scheduler(sc, config.cache, self.num_blocks, num_swap_slots(config),
                                   min_tokens_per_swapped_block(mc, self.kv_block_bytes), config.steps_in_flight)
        self._in_flight: deque = deque()  # SchedulerOutputs submitted and not yet collected, oldest first
        # None: no speculation. Medusa and EAGLE share the target's LM head (the runner's model).
        self.proposer = make_proposer(config, self.num_blocks, self.device, self.tokenizer, self.runner)
        self.draft_length = DraftLength(config.speculative, estimate_draft_cost(config))
        self._propose_seconds = 0.0
        self._tokens_sampled = 0
        self.input_processor = InputProcessor(self.tokenizer, sc.max_model_len, mc.vocab_size, self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        # What start-up built lives as long as the engine: move it out of the collector's reach, so
        # that the collections a busy step loop triggers scan only new objects (they took ~4% of a
        # 32-sequence step, perf).
        gc.collect()
        gc.freeze()
        startup_phases.mark("engine ready (scheduler, sampler, collector frozen)")

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt: PromptType, params, priority: int = 0) -> None:
        """Validate and queue a request; raises InvalidRequestError (nothing is queued then)."""
        self.add_prepared(self.prepare_request(request_id, prompt, params, priority))

    def prepare_request(self, request_id: str, prompt: PromptType, params, priority: int = 0) -> PreparedRequest:
        """Tokenize and validate without touching engine state (safe beside a running step)."""
        text, prompt_ids = self.input_processor.tokenize(prompt)
        requests = self.input_processor.make_requests(request_id, prompt_ids, params, priority)
        try:
            for r in requests:
                self.scheduler.check_request(r)
            if params.guided_decoding is not None:  # compiled now: a 400 before queueing, a cache hit in the step
                self.guided.compile(params.guided_decoding)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        return PreparedRequest(request_id, text, requests, params)

    def add_prepared(self, prep: PreparedRequest) -> None:
        if prep.request_id in self.output_processor.states:
            raise InvalidRequestError(f"request id {prep.request_id!r} is already in use")
        for r in prep.requests:
            self.scheduler.add_request(r)
        self.output_processor.add_request(prep.request_id, prep.prompt, prep.requests, prep.params)

    def abort_request(self, request_ids) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            self.scheduler.abort_requests(self.output_processor.abort(rid))

    def end_sample(self, request_id: str, index: int) -> list[RequestOutput]:
        """Stop sample `index` of a request whose caller has what it wants of that sample (its
        tool call under parallel_tool_calls=false) while the other samples go on: its tokens stop,
        its KV blocks are freed, its finish reason is "ended". Returns the request's output (finished
        once every sample is); nothing for a request or sample that has already finished."""
        core_id = self.output_processor.sample_id(request_id, index)
        req = self.scheduler.requests.get(core_id) if core_id is not None else None
        if req is None:
            return []
        self.scheduler.finish_requests([core_id], RequestStatus.FINISHED_ENDED)
        return self.output_processor.process([req], {})[0]

    def release_held(self, request_ids) -> None:
        """Free the KV blocks kept by finished hold_blocks requests (beam search's previous round)."""
        self.scheduler.release_held(request_ids)

    def step(self) -> list[RequestOutput]:
        while len(self._in_flight) < self.config.steps_in_flight:
            sched = self.scheduler.schedule()
            self.executor.submit(sched)
            self._in_flight.append(sched)
        sched_out = self._in_flight.popleft()
        runner_out = self.executor.collect()
        self._tokens_sampled += sum(map(len, runner_out.sampled_token_ids))
        changed = self.scheduler.update_from_output(sched_out, runner_out)
        logprobs = {rid: lp for rid, lp in zip(runner_out.request_ids, runner_out.logprobs or []) if lp}
        prompt_lps = {rid: c for rid, c in zip(runner_out.request_ids, runner_out.prompt_logprobs or []) if c}
        outputs, stopped = self.output_processor.process(changed, logprobs, prompt_lps)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if self.proposer is not None:  # drafts for the next step, verified in it
            start = time.perf_counter()
            outputs += self._propose(sched_out, runner_out)
            self._propose_seconds += time.perf_counter() - start
        return outputs

    def _propose(self, sched_out, runner_out) -> list[RequestOutput]:
        """Drafts for the requests that decode next, as many as each request's acceptance pays for.
        Requests gone since the previous step lose their proposer state. A request whose proposal
        raises ends with finish reason "error" (its outputs are returned); the others go on."""
        left_ids = sched_out.finished_request_ids | sched_out.preempted_request_ids
        self.proposer.free(left_ids)
        self.draft_length.free(left_ids)
        for sr, tokens in zip(sched_out.scheduled, runner_out.sampled_token_ids):
            if sr.spec_token_ids:
                self.draft_length.observe(sr.request_id, len(sr.spec_token_ids), len(tokens) - 1)
        if self.config.speculative.uses_target_hidden_states:
            self._observe_hidden_states(runner_out)
        candidates = self.scheduler.spec_candidates()
        num_drafts = self.draft_length.choose([r.request_id for r in candidates], len(self.scheduler.running))
        requests = [r for r in candidates if r.request_id in num_drafts]
        drafts, failed = propose_isolating_failures(self.proposer, requests, num_drafts)
        self.scheduler.set_spec_tokens(drafts, {rid: self.proposer.draft_probs(rid) for rid in drafts})
        if not failed:
            return []
        requests = [self.scheduler.requests[rid] for rid in failed]
        self.scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR)
        return self.output_processor.process(requests, {})[0]

    def _observe_hidden_states(self, runner_out) -> None:
        """Hand the proposer the hidden rows of the requests still running. Should it raise, their
        proposer state goes (they decode without drafts until it has rows again); no request fails."""
        pairs = [(req, rows) for rid, rows in zip(runner_out.request_ids, runner_out.hidden_states or [])
                 if (req := self.scheduler.requests.get(rid)) is not None and req.status is RequestStatus.RUNNING]
        try:
            self.proposer.observe(pairs)
        except Exception:
            logger.exception("the proposer failed to take the step's hidden states; its requests go without drafts")
            self.proposer.free([req.request_id for req, _ in pairs])

    def shutdown(self) -> None:
        """Stop the model's worker processes, if any (also done when the engine is collected or at exit)."""
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_stats(self) -> EngineStats:
        s = self.scheduler.get_stats()
        return EngineStats(**vars(s), kv_cache_bytes_reserved=self.num_blocks * self.kv_block_bytes,
                           kv_cache_bytes_touched=s.kv_blocks_touched * self.kv_block_bytes,
                           spec_propose_seconds_total=self._propose_seconds,
                           tokens_sampled_total=self._tokens_sampled)
