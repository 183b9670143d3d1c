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

from flashserve.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never", as in transformers

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


def beam_search(engine, prompt_ids: list[int], p: BeamSearchParams, eos_token_ids) -> BeamSearchOutput:
    k = p.beam_width
    step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * k, ignore_eos=True)
    beams = [_Beam([], 0.0, None)]
    finished: list[BeamSequence] = []
    held: list[str] = []  # this round's requests: their blocks stay for the next round's forks
    prev: list[str] = []

    def add_hypothesis(seq: BeamSequence, length: int) -> None:
        seq.score = seq.cum_logprob / (max(length, 1) ** p.length_penalty)
        finished.append(seq)
        if len(finished) > k:
            finished.remove(min(finished, key=lambda s: s.score))

    try:
        for cur_len in range(1, p.max_tokens + 1):
            prev, held = held, []
            for beam in beams:
                held.append(_add_step(engine, prompt_ids + beam.tokens, beam.parent_id, step_params))
            engine.release_held(prev)  # the new requests hold references to what they share
            beams = _next_beams(beams, held, _wait(engine, held), k, eos_token_ids, add_hypothesis)
            if not beams or _done(finished, beams[0].cum_logprob, cur_len, p):
                break
        else:
            for beam in beams:  # out of tokens: the live beams compete as they are
                add_hypothesis(BeamSequence(beam.tokens, beam.cum_logprob), len(beam.tokens))
    finally:  # also on an error: nothing of this search may keep blocks
        engine.abort_request(held)
        engine.release_held(prev + held)
    return BeamSearchOutput(sorted(finished, key=lambda s: -s.score))


def _next_beams(beams: list[_Beam], request_ids: list[str], outputs: list[dict[int, float]], k: int,
                eos_token_ids, add_hypothesis) -> list[_Beam]:
    """Of the 2k best extensions, those ending in EOS within the first k become hypotheses; the
    others fill the k beams of the next round, each forking the request that computed its beam."""
    candidates = []
    for beam, rid, out in zip(beams, request_ids, outputs):
        for tok, lp in out.items():
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


def _add_step(engine, tokens: list[int], parent_id: str | None, params: SamplingParams) -> str:
    """Queue one greedy step of a beam that forks its parent's blocks and keeps its own when done."""
    rid = engine.next_request_id()
    prep = engine.prepare_request(rid, {"prompt_token_ids": tokens}, params)
    (req,) = prep.requests
    req.parent_id, req.hold_blocks = parent_id, True
    engine.add_prepared(prep)
    return rid


def _wait(engine, ids: list[str]) -> list[dict[int, float]]:
    """Step until the round's requests finish; each one's {token: logprob} over its top 2k."""
    done = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [{t: lp.logprob for t, lp in done[rid].outputs[0].logprobs[0].items()} for rid in ids]
