"""Beam search as a request-level driver on top of the engine (not inside the sampler).

Each round asks the engine for one greedy step of every live beam with its top-2k logprobs;
the prefix cache makes that cost one partial block per beam, not a recompute. Candidate
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
    beams = [BeamSequence([], 0.0)]
    finished: list[BeamSequence] = []

    def add_hypothesis(seq: BeamSequence, length: int) -> None:
        seq.score = seq.cum_logprob / (max(length, 1) ** p.length_penalty)
        finished.append(seq)
        if len(finished) > k:
            finished.remove(min(finished, key=lambda s: s.score))

    for cur_len in range(1, p.max_tokens + 1):
        outputs = _run_round(engine, prompt_ids, beams, step_params)
        candidates = []
        for beam, out in zip(beams, outputs):
            for tok, lp in out.items():
                candidates.append((beam.cum_logprob + lp, beam, tok))
        candidates.sort(key=lambda c: -c[0])
        next_beams = []
        for rank, (score, beam, tok) in enumerate(candidates[: 2 * k]):
            if tok in eos_token_ids:
                if rank < k:
                    add_hypothesis(BeamSequence(beam.tokens + [tok], score), len(beam.tokens) + 1)
            else:
                next_beams.append(BeamSequence(beam.tokens + [tok], score))
            if len(next_beams) == k:
                break
        beams = next_beams
        if not beams or _done(finished, beams[0].cum_logprob, cur_len, p):
            break
    else:
        for beam in beams:  # out of tokens: the live beams compete as they are
            add_hypothesis(BeamSequence(beam.tokens, beam.cum_logprob), len(beam.tokens))
    return BeamSearchOutput(sorted(finished, key=lambda s: -s.score))


def _run_round(engine, prompt_ids, beams, params) -> list[dict[int, float]]:
    """One greedy step per beam; returns each beam's {token: logprob} over its top 2k."""
    ids = []
    for beam in beams:
        rid = engine.next_request_id()
        engine.add_request(rid, {"prompt_token_ids": prompt_ids + beam.tokens}, params)
        ids.append(rid)
    done = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [{t: lp.logprob for t, lp in done[rid].outputs[0].logprobs[0].items()} for rid in ids]
