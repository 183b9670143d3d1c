"""Incremental detokenization, stop strings and logprob formatting → RequestOutput.

Owned by the engine. Reads core Requests after the scheduler updated them; reports
which requests hit a stop string so the engine can finish them in the scheduler.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from flashserve.core.request import Request
from flashserve.core.sched_output import PromptLogprobs, SampledLogprobs
from flashserve.outputs import CompletionOutput, Logprob, RequestOutput
from flashserve.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class _Sample:
    request: Request
    detok: IncrementalDetokenizer
    text: str = ""  # finalized text (after stop-string truncation)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    num_tokens: int | None = None  # set when a stop string ended it: tokens after it are not output


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: object
    samples: list[_Sample]
    # One entry per prompt token when prompt_logprobs was asked: None for the first token.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self.sample_of: dict[str, tuple[_RequestState, _Sample]] = {}  # core request id → its state

    def add_request(self, request_id: str, prompt: str | None, requests: list[Request], params) -> None:
        samples = [
            _Sample(
                request=r,
                detok=IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids, params.skip_special_tokens),
                logprobs=[] if r.sampling_params.logprobs is not None else None,
                cumulative_logprob=0.0 if r.sampling_params.logprobs is not None else None,
            )
            for r in requests
        ]
        state = _RequestState(request_id, prompt, requests[0].prompt_token_ids, params, samples)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(state.prompt_token_ids)
        self.states[request_id] = state
        for s in samples:
            self.sample_of[s.request.request_id] = (state, s)

    def abort(self, request_id: str) -> list[str]:
        """Forget a user request; returns its core request ids (for the scheduler)."""
        state = self.states.pop(request_id, None)
        if state is None:
            return []
        ids = [s.request.request_id for s in state.samples]
        for rid in ids:
            self.sample_of.pop(rid, None)
        return ids

    def sample_id(self, request_id: str, index: int) -> str | None:
        """The core request id of sample `index` (as CompletionOutput.index numbers it) of a
        request in flight; None once the request has finished or when it has no such sample."""
        state = self.states.get(request_id)
        if state is None or not 0 <= index < len(state.samples):
            return None
        if state.params.num_samples > state.params.n:
            raise ValueError("best_of > n: an output's index is its rank, known only at the end")
        return state.samples[index].request.request_id

    def process(self, changed: list[Request], logprobs_by_id: dict[str, list],
                prompt_logprobs_by_id: dict[str, PromptLogprobs] | None = None
                ) -> tuple[list[RequestOutput], list[str]]:
        """Returns (outputs of the user requests that changed, core ids that hit a stop string)."""
        for rid, chunk in (prompt_logprobs_by_id or {}).items():
            entry = self.sample_of.get(rid)
            if entry is not None and entry[0].prompt_logprobs is not None:
                self._add_prompt_logprobs(entry[0], chunk)
        touched: dict[str, _RequestState] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for req in changed:
            entry = self.sample_of.get(req.request_id)
            if entry is None:
                continue
            state, sample = entry
            if state.first_token_time is None and req.num_output_tokens:
                state.first_token_time = now
            if sample.finish_reason is None:
                if self._update_sample(sample, state.params, logprobs_by_id.get(req.request_id)):
                    stopped.append(req.request_id)
            touched[state.request_id] = state
        # best_of > n: which n are returned is known only when all best_of samples are done.
        outputs = [self._make_output(s, now) for s in touched.values()
                   if s.finished or s.params.num_samples == s.params.n]
        for state in touched.values():
            if state.finished:
                self.abort(state.request_id)
        return outputs, stopped

    def _update_sample(self, sample: _Sample, params, new_logprobs) -> bool:
        """Tokens are taken one at a time (a speculative step brings several), so a stop string ends
        the output at the token that completes it, as it would have without speculation."""
        req = sample.request
        seen = len(sample.detok.token_ids)
        new = req.output_token_ids[seen:]
        hit = None
        for i, tok in enumerate(new):
            prev_len = len(sample.detok.text)
            sample.detok.add_tokens([tok])
            hit = _find_stop(sample.detok.text, params.stop, prev_len)
            if hit is not None:
                new = new[: i + 1]
                sample.num_tokens = seen + i + 1
                break
        if new_logprobs and sample.logprobs is not None:
            for entry in new_logprobs[: len(new)]:
                sample.logprobs.append(self._format_logprobs(entry))
            self._accumulate(sample, new)
        full = sample.detok.text
        if hit is not None:
            index, stop = hit
            sample.text = full[: index + len(stop)] if params.include_stop_str_in_output else full[:index]
            sample.finish_reason, sample.stop_reason = "stop", stop
            return True
        if req.is_finished:
            sample.text = full
            sample.finish_reason, sample.stop_reason = req.status.finish_reason, req.stop_reason
        else:
            # Hold back what could be the start of a stop string, so streamed text never shows one.
            hold = max((len(s) for s in params.stop), default=1) - 1
            sample.text = full[: len(full) - hold] if hold else full
        return False

    def _add_prompt_logprobs(self, state: _RequestState, chunk: PromptLogprobs) -> None:
        """vLLM's shape: the prompt token first (with its rank in the vocabulary), then the top-N."""
        for j, (lp, rank, top) in enumerate(zip(chunk.token_logprobs, chunk.token_ranks, chunk.top)):
            pos = chunk.start + j
            state.prompt_logprobs[pos] = self._logprob_entry(state.prompt_token_ids[pos], lp, rank, top)

    def _logprob_entry(self, tok: int, lp: float, rank: int, top: dict[int, float]) -> dict[int, Logprob]:
        """The token with its rank in the vocabulary, then the top-N ranked by position."""
        decode = self._decode_one
        entry = {tok: Logprob(lp, rank, decode(tok))}
        for r, (t, v) in enumerate(top.items(), start=1):
            entry.setdefault(t, Logprob(v, r, decode(t)))
        return entry

    def _decode_one(self, tok: int) -> str:
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def _format_logprobs(self, lps: SampledLogprobs) -> dict[int, Logprob]:
        """Most likely first; the sampled token keeps its true rank even outside the top-N."""
        entry = self._logprob_entry(lps.token_id, lps.logprob, lps.rank, lps.top)
        return dict(sorted(entry.items(), key=lambda kv: -kv[1].logprob))

    def _accumulate(self, sample: _Sample, new_tokens: list[int]) -> None:
        for tok, entry in zip(new_tokens, sample.logprobs[-len(new_tokens):]):
            if tok in entry:
                sample.cumulative_logprob += entry[tok].logprob

    def _make_output(self, state: _RequestState, now: float) -> RequestOutput:
        samples = state.samples
        if state.params.num_samples > state.params.n:  # best_of: the n most likely, best first (vLLM)
            samples = sorted(samples, key=lambda s: -s.cumulative_logprob)[: state.params.n]
        show_logprobs = state.params.logprobs is not None
        completions = tuple(
            CompletionOutput(
                index=i,
                text=s.text,
                token_ids=tuple(s.request.output_token_ids[: s.num_tokens]),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=tuple(s.logprobs) if show_logprobs else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(samples)
        )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=tuple(state.prompt_token_ids),
            outputs=completions,
            finished=state.finished,
            prompt_logprobs=tuple(state.prompt_logprobs) if state.prompt_logprobs is not None else None,
            num_cached_tokens=state.samples[0].request.num_cached_prompt_tokens,
            metrics={"arrival_time": state.arrival_time, "first_token_time": state.first_token_time, "now": now,
                     # speculative decoding, over all samples: drafts verified and accepted (0 when off)
                     "spec_draft_tokens": sum(s.request.num_draft_tokens for s in state.samples),
                     "spec_accepted_tokens": sum(s.request.num_accepted_tokens for s in state.samples)},
        )


def _find_stop(text: str, stops: list[str], prev_len: int) -> tuple[int, str] | None:
    """Earliest stop string in `text` that ends after prev_len (it may start before: token boundaries)."""
    best = None
    for stop in stops:
        start = max(0, prev_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
