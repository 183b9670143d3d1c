"""Beam search as a request-level driver on top of the engine (not inside the sampler).

Each round asks the engine for one greedy step of every live beam with its top-2k logprobs.
The beams share their KV blocks through the block manager's reference counts: every step
request is marked hold_blocks, so when it finishes the scheduler keeps its blocks; the next
round's request for beam i extended by token t names it as parent and forks its block table
(the partly filled last block included), computing only t; writing t copies a shared partial
block first. Round 1 computes the prompt once and every beam of round 2 forks it. Once a
round's requests are added, the previous round's are released. A request that finds no seat,
or whose parent's blocks the scheduler gave back when memory ran short, runs as an ordinary one
through the prefix cache, with the same result. Candidate
selection and finishing follow the classic beam search of Hugging Face's `generate`
(num_beams, length_penalty, early_stopping): of the 2k best (beam, token) extensions, those
ending in EOS within the first k become hypotheses scored sum_logprobs / len**length_penalty
(len = generated tokens, the EOS included), the rest fill the k beams of the next round.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flashserve.outputs import CompletionOutput, RequestOutput
from flashserve.sampling_params import GuidedDecodingParams, SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never", as in transformers
    # a grammar every sequence follows: each step's candidates are the tokens it allows after the
    # beam's tokens, scored by the model's own logprobs (transformers' prefix_allowed_tokens_fn)
    guided_decoding: GuidedDecodingParams | None = None

    def __post_init__(self) -> None:
        if self.beam_width < 1 or self.max_tokens < 1:
            raise ValueError("beam_width and max_tokens must be >= 1")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclass
class BeamSequence:
    tokens: list[int]  # generated tokens (the EOS included for finished ones)
    cum_logprob: float
    score: float = 0.0


@dataclass
class _Beam:
    tokens: list[int]  # generated so far
    cum_logprob: float
    parent_id: str | None  # held request whose KV holds the prompt and every token but the last


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSequence] = field(default_factory=list)  # best first


def _done(finished: list[BeamSequence], best_running: float, cur_len: int, p: BeamSearchParams) -> bool:
    if len(finished) < p.beam_width:
        return False
    if p.early_stopping is True:
        return True
    worst = min(s.score for s in finished)
    if p.early_stopping == "never" and p.length_penalty > 0:
        bound = best_running / (p.max_tokens ** p.length_penalty)
    else:
        bound = best_running / (cur_len ** p.length_penalty)
    return worst >= bound


class BeamSearch:
    """The search itself, apart from any engine: which beams to extend next (each a greedy step
    with its top-2k logprobs) and what those logprobs make of them. A driver runs the rounds."""

    def __init__(self, p: BeamSearchParams, eos_token_ids):
        self.p, self.eos_token_ids = p, eos_token_ids
        self.beams: list[_Beam] = [_Beam([], 0.0, None)]
        self.finished: list[BeamSequence] = []
        self.cur_len = 0
        self.over = False

    def next_round(self) -> list[_Beam]:
        """The beams the next round extends; none once the search is over."""
        return [] if self.over else self.beams

    def take(self, request_ids: list[str], outputs: list[dict[int, float]]) -> None:
        """The round's result: per beam of next_round(), the request that computed it (the next
        round's beams fork it) and its {token: logprob} over the top 2k."""
        self.cur_len += 1
        k, p = self.p.beam_width, self.p
        self.beams = _next_beams(self.beams, request_ids, outputs, k, self.eos_token_ids, self._add_hypothesis)
        if not self.beams or _done(self.finished, self.beams[0].cum_logprob, self.cur_len, p):
            self.over = True
        elif self.cur_len == p.max_tokens:
            for beam in self.beams:  # out of tokens: the live beams compete as they are
                self._add_hypothesis(BeamSequence(beam.tokens, beam.cum_logprob), len(beam.tokens))
            self.over = True

    def _add_hypothesis(self, seq: BeamSequence, length: int) -> None:
        seq.score = seq.cum_logprob / (max(length, 1) ** self.p.length_penalty)
        self.finished.append(seq)
        if len(self.finished) > self.p.beam_width:
            self.finished.remove(min(self.finished, key=lambda s: s.score))

    def result(self) -> BeamSearchOutput:
        return BeamSearchOutput(sorted(self.finished, key=lambda s: -s.score))


def beam_request_output(engine, request_id: str, prompt: str | None, prompt_ids: list[int], result: BeamSearchOutput,
                        n: int, skip_special_tokens: bool = True) -> RequestOutput:
    """The n best sequences, best first, as one finished RequestOutput (no logprobs: a beam's
    tokens were not sampled from one distribution each)."""
    eos = engine.eos_token_ids
    outputs = tuple(
        CompletionOutput(
            index=i,
            text=engine.tokenizer.decode(seq.tokens, skip_special_tokens=skip_special_tokens),
            token_ids=tuple(seq.tokens),
            cumulative_logprob=seq.cum_logprob,
            finish_reason="stop" if seq.tokens and seq.tokens[-1] in eos else "length",
        )
        for i, seq in enumerate(result.sequences[:n])
    )
    return RequestOutput(request_id, prompt, tuple(prompt_ids), outputs, finished=True)


def step_params(p: BeamSearchParams, beam: _Beam) -> SamplingParams:
    """One greedy step of a beam with its top-2k logprobs (under the grammar, if any)."""
    if p.guided_decoding is None:
        return SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * p.beam_width, ignore_eos=True)
    return SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * p.beam_width,
                          guided_decoding=p.guided_decoding, beam_grammar_prefix=tuple(beam.tokens))


def beam_search(engine, prompt_ids: list[int], p: BeamSearchParams, eos_token_ids) -> BeamSearchOutput:
    """The search on an idle LLMEngine, stepping it here."""
    search = BeamSearch(p, eos_token_ids)
    held: list[str] = []  # this round's requests: their blocks stay for the next round's forks
    prev: list[str] = []
    try:
        while beams := search.next_round():
            prev, held = held, []
            for beam in beams:
                prep = step_request(engine, prompt_ids, beam, p)
                engine.add_prepared(prep)
                held.append(prep.request_id)
            engine.release_held(prev)  # the new requests hold references to what they share
            search.take(held, _wait(engine, held))
    finally:  # also on an error: nothing of this search may keep blocks
        engine.abort_request(held)
        engine.release_held(prev + held)
    return search.result()


async def beam_search_async(engine, prompt_ids: list[int], p: BeamSearchParams, eos_token_ids,
                            priority: int = 0) -> BeamSearchOutput:
    """The search through an AsyncLLMEngine, beside the requests it serves; each round's steps
    are batched with theirs. Cancelled (client gone), it aborts its steps and frees their blocks."""
    search = BeamSearch(p, eos_token_ids)
    held: list[str] = []
    prev: list[str] = []
    try:
        while beams := search.next_round():
            preps = [step_request(engine.engine, prompt_ids, beam, p, priority) for beam in beams]
            prev, held = held, [prep.request_id for prep in preps]
            outputs = await engine.run_round(preps, release=prev)
            search.take(held, [top_logprobs(out) for out in outputs])
    finally:
        engine.release_held(prev + held)
    return search.result()


def _next_beams(beams: list[_Beam], request_ids: list[str], outputs: list[dict[int, float]], k: int,
                eos_token_ids, add_hypothesis) -> list[_Beam]:
    """Of the 2k best extensions, those ending in EOS within the first k become hypotheses; the
    others fill the k beams of the next round, each forking the request that computed its beam."""
    candidates = []
    for beam, rid, out in zip(beams, request_ids, outputs):
        for tok, lp in out.items():
            if lp > float("-inf"):  # -inf: a token the grammar does not allow (fewer than 2k do)
                candidates.append((beam.cum_logprob + lp, beam, tok, rid))
    candidates.sort(key=lambda c: -c[0])
    next_beams = []
    for rank, (score, beam, tok, rid) in enumerate(candidates[: 2 * k]):
        if tok in eos_token_ids:
            if rank < k:
                add_hypothesis(BeamSequence(beam.tokens + [tok], score), len(beam.tokens) + 1)
        else:
            next_beams.append(_Beam(beam.tokens + [tok], score, rid))
        if len(next_beams) == k:
            break
    return next_beams


def step_request(engine, prompt_ids: list[int], beam: _Beam, p: BeamSearchParams, priority: int = 0):
    """A beam's next step, prepared to fork its parent's blocks and keep its own when done."""
    prep = engine.prepare_request(engine.next_request_id(), {"prompt_token_ids": prompt_ids + beam.tokens},
                                  step_params(p, beam), priority)
    (req,) = prep.requests
    req.parent_id, req.hold_blocks = beam.parent_id, True
    return prep


def top_logprobs(out) -> dict[int, float]:
    """A finished step's {token: logprob} over its top 2k."""
    return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}


def _wait(engine, ids: list[str]) -> list[dict[int, float]]:
    """Step until the round's requests finish; each one's {token: logprob} over its top 2k."""
    done = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [top_logprobs(done[rid]) for rid in ids]
