"""Batched sampling: every row carries its own parameters; no Python loop over rows except
drawing noise for rows with their own seeded generator (so their tokens do not depend on
the rest of the batch).

Per row, in order: logit bias → min_tokens mask of EOS/stop tokens → penalties →
[logprobs are taken here: log_softmax of these processed logits, before temperature]
→ grammar mask (structured output: tokens outside the row's grammar get -inf; after the
logprobs, which stay the model's own and finite, except on a beam search step under a grammar,
whose top-N must be tokens the grammar allows: there the same mask sets the others' logprobs to
-inf, the model's own logprobs of the allowed ones unchanged, as transformers' constrained beam
search scores them) → greedy argmax if temperature == 0,
else temperature → top-k → top-p (nucleus, Holtzman et al. 2019: the smallest set of most
likely tokens whose mass reaches p, computed after top-k) → min-p (tokens with p >= min_p * p_max) → draw.
Drawing uses the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with
probability p_i exactly (the Gumbel-max trick in another form).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.core.sched_output import SampledLogprobs
from flashserve.kernels import ops
from flashserve.sample.penalties import apply_penalties, token_counts


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # (rows,) float32, 1.0 on greedy rows
    greedy: torch.Tensor  # (rows,) bool
    all_greedy: bool
    top_k: torch.Tensor | None  # (rows,) int64, vocab where off; None if no row uses it
    top_p: torch.Tensor | None  # (rows,) float32
    min_p: torch.Tensor | None  # (rows,) float32
    penalties: tuple | None  # (prompt_mask, output_counts, repetition, presence, frequency)
    bias: tuple | None  # (rows, cols, values) to add
    banned: tuple | None  # (rows, cols) forced to -inf (min_tokens)
    generators: list[torch.Generator | None]
    num_logprobs: list[int | None]
    grammar: tuple | None = None  # (rows int64 (k,), allowed bool (k, vocab)) of rows with guided decoding
    grammar_logprobs: tuple | None = None  # the same for the rows whose logprobs it masks (beam steps)

    @classmethod
    def build(cls, params, output_token_ids, prompt_token_ids, generators, eos_token_ids, device,
              vocab_size: int | None = None, grammar: tuple[list[int], torch.Tensor] | None = None
              ) -> "SamplingMetadata":
        """`grammar`: sample/guided.py's masks for this batch, if any row has guided decoding."""
        f32 = dict(dtype=torch.float32, device=device)
        greedy = [p.is_greedy for p in params]
        temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], **f32)
        sampled = [p for p, g in zip(params, greedy) if not g]
        top_k = top_p = min_p = None
        if any(p.top_k > 0 for p in sampled):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else 1 << 30 for p in params], dtype=torch.int64,
                                 device=device)
        if any(p.top_p < 1.0 for p in sampled):
            top_p = torch.tensor([p.top_p for p in params], **f32)
        if any(p.min_p > 0.0 for p in sampled):
            min_p = torch.tensor([p.min_p for p in params], **f32)
        penalties = None
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            penalties = (
                [list(t) for t in prompt_token_ids], [list(t) for t in output_token_ids],
                torch.tensor([p.repetition_penalty for p in params], **f32),
                torch.tensor([p.presence_penalty for p in params], **f32),
                torch.tensor([p.frequency_penalty for p in params], **f32),
            )
        bias = _sparse([(i, t, v) for i, p in enumerate(params) for t, v in (p.logit_bias or {}).items()], device)
        banned_pairs = []
        allowed_of = dict(zip(grammar[0], grammar[1])) if grammar else {}
        for i, (p, out) in enumerate(zip(params, output_token_ids)):
            if len(out) < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                allowed = allowed_of.get(i)
                if allowed is not None and allowed.sum() == allowed[list(stops)].sum():
                    continue  # the grammar is complete and allows only stopping: it wins over min_tokens
                banned_pairs += [(i, t, 0.0) for t in stops]
        banned = _sparse(banned_pairs, device)
        grammar_t = grammar_logprobs = None
        if grammar:
            grammar_t = (torch.tensor(grammar[0], dtype=torch.int64, device=device), grammar[1].to(device))
            beam_steps = [j for j, i in enumerate(grammar[0]) if params[i].beam_grammar_prefix is not None]
            if beam_steps:
                grammar_logprobs = (grammar_t[0][beam_steps], grammar_t[1][beam_steps])
        return cls(
            temperature=temperature, greedy=torch.tensor(greedy, device=device), all_greedy=all(greedy),
            top_k=top_k, top_p=top_p, min_p=min_p, penalties=penalties,
            bias=bias, banned=banned[:2] if banned else None,
            generators=list(generators), num_logprobs=[p.logprobs for p in params],
            grammar=grammar_t, grammar_logprobs=grammar_logprobs,
        )


def _sparse(triples, device):
    if not triples:
        return None
    rows, cols, vals = zip(*triples)
    return (torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(cols, dtype=torch.int64, device=device),
            torch.tensor(vals, dtype=torch.float32, device=device))


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # (rows,) int64
    logprobs: torch.Tensor | None  # (rows, vocab) log_softmax of processed logits, when asked
    num_logprobs: list[int | None]

    @property
    def has_logprobs(self) -> bool:
        return self.logprobs is not None

    def format_logprobs(self) -> list[SampledLogprobs | None]:
        """Per row: the sampled token's logprob and true rank, and its row's top-N (None if not asked)."""
        n = max(k for k in self.num_logprobs if k is not None)
        chosen, ranks, top = token_logprobs(self.logprobs, self.sampled_token_ids, n)
        sampled = self.sampled_token_ids.tolist()
        out: list[SampledLogprobs | None] = []
        for row, k in enumerate(self.num_logprobs):
            row_top = dict(list(top[row].items())[:k]) if k else {}
            out.append(None if k is None else SampledLogprobs(sampled[row], chosen[row], ranks[row], row_top))
        return out


class Sampler:
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits: (rows, vocab) float32 → SamplerOutput."""
        logits = process_logits(logits, md)
        want_logprobs = any(k is not None for k in md.num_logprobs)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if logprobs is not None and md.grammar_logprobs is not None:
            logprobs = apply_grammar(logprobs, *md.grammar_logprobs)
        if md.grammar is not None:
            logits = apply_grammar(logits, *md.grammar)
        greedy_ids = ops.argmax_rows(logits)
        if md.all_greedy:
            return SamplerOutput(greedy_ids, logprobs, md.num_logprobs)
        probs = sampling_probs(logits, md)
        drawn = exponential_race(probs, md.generators)
        return SamplerOutput(torch.where(md.greedy, greedy_ids, drawn), logprobs, md.num_logprobs)


def process_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Bias, min_tokens ban and penalties: what the logprobs and the draw both see."""
    logits = logits.float()
    if md.bias is not None or md.banned is not None or md.penalties is not None:
        logits = logits.clone()
    if md.bias is not None:
        logits.index_put_(md.bias[:2], md.bias[2], accumulate=True)
    if md.banned is not None:
        logits[md.banned] = float("-inf")
    if md.penalties is not None:
        prompts, outputs, rep, pres, freq = md.penalties
        vocab = logits.shape[1]
        prompt_mask = token_counts(prompts, vocab, logits.device) > 0
        logits = apply_penalties(logits, prompt_mask, token_counts(outputs, vocab, logits.device), rep, pres, freq)
    return logits


def apply_grammar(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits: (rows, vocab); rows: (k,) with allowed: (k, vocab) bool → tokens outside a row's grammar at -inf."""
    return logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))


def sampling_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p → (rows, vocab) probabilities (zero outside the kept set)."""
    x = logits / md.temperature.unsqueeze(1)
    if md.top_k is not None or md.top_p is not None:
        sorted_x, order = x.sort(dim=-1, descending=True)
        ranks = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        if md.top_k is not None:
            sorted_x = sorted_x.masked_fill(ranks >= md.top_k.unsqueeze(1), float("-inf"))
        if md.top_p is not None:
            p = sorted_x.softmax(dim=-1)
            mass_before = p.cumsum(dim=-1) - p  # mass of strictly more likely tokens
            drop = (mass_before >= md.top_p.unsqueeze(1)) & (md.top_p.unsqueeze(1) < 1.0)
            sorted_x = sorted_x.masked_fill(drop & (ranks > 0), float("-inf"))
        x = torch.empty_like(x).scatter_(1, order, sorted_x)
    probs = x.softmax(dim=-1)
    if md.min_p is not None:
        threshold = md.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:  # a seeded row draws only from its own stream
            noise[row].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int):
    """token_logprobs of raw logits (prompt logprobs)."""
    return token_logprobs(torch.log_softmax(logits.float(), dim=-1), targets, k)


def token_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, k: int):
    """logprobs: (rows, vocab), targets: (rows,) → per row the target's logprob, its rank in the
    vocabulary (1 + the number of strictly more likely tokens, so ties count in its favour) and
    the top-k {token: logprob}, most likely first."""
    chosen = logprobs.gather(1, targets.view(-1, 1))  # (rows, 1)
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # (rows,)
    top: list[dict[int, float]] = [{} for _ in range(logprobs.shape[0])]
    if k:
        vals, ids = logprobs.topk(k, dim=-1)
        top = [dict(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return chosen.squeeze(1).tolist(), ranks.tolist(), top
