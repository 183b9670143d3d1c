"""What the scheduler decided for one step; the model runner turns it into tensors.

Schedule tokens, not phases: every request simply gets `num_scheduled_tokens` new
tokens, the positions num_computed_tokens .. num_computed_tokens + n - 1. A prefill,
a prefill chunk, a decode, a prefix-cache hit and a decode with k draft tokens are all
that one case. The drafts are the last k of those positions, after the request's known tokens:

    token_ids:        [ ... t_{L-2} t_{L-1} ]            spec_token_ids: [d_0 ... d_{k-1}]
    scheduled:                      t_{L-1}  d_0 ... d_{k-1}      (n = k + 1, positions L-1 .. L+k-1)
    sampled rows:                   k + 1: the target's distribution after t_{L-1}, d_0, ..., d_{k-1}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the request's all_token_ids (shared, not copied)
    num_computed_tokens: int  # K/V already cached before this step
    num_scheduled_tokens: int  # tokens to compute this step
    block_ids: list[int]  # the request's whole block table after allocation
    sampling_params: Any
    output_token_ids: list[int]  # generated so far (penalties read them)
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify (the last positions)
    # The proposer's distribution q of sampled drafts, (>= k, vocab) tensor; None: deterministic drafts (one-hot q).
    spec_token_probs: Any = None

    @property
    def samples_this_step(self) -> bool:
        """True when this step reaches the last known token (and its drafts), so tokens are sampled."""
        return self.num_computed_tokens + self.num_scheduled_tokens == len(self.token_ids) + len(self.spec_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests that left since the previous step (finished, aborted or preempted):
    # the runner drops any per-request state it keeps for them.
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)
    # Copy-on-write of shared, partly filled blocks (src, dst), done before the forward.
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # KV swap (core/swap_space.py): (block, slot) of preempted requests, copied out first;
    # (slot, block) of resumed ones, copied in after the copy-on-write, before the forward.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(r.num_scheduled_tokens for r in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class PromptLogprobs:
    """Logprobs of a run of prompt tokens computed in one step (chunked prefill sends several).

    Entry j is about prompt position `start + j` (>= 1): the logprob of that prompt token given
    the tokens before it, the token's rank in the whole vocabulary (1 = most likely), and the
    top-N alternatives as {token_id: logprob}, most likely first.
    """

    start: int
    token_logprobs: list[float]
    token_ranks: list[int]
    top: list[dict[int, float]]


@dataclass
class SampledLogprobs:
    """Logprobs of one sampled token: its logprob and rank in the whole vocabulary (1 = most
    likely; ties count in its favour), and the top-N alternatives as {token_id: logprob}."""

    token_id: int
    logprob: float
    rank: int
    top: dict[int, float]


@dataclass
class HiddenRows:
    """The target's last hidden states (after the final norm, before the LM head) of the positions
    first_position .. first_position + n - 1 that a step computed and that stay in the request's
    sequence: a prompt chunk's rows, or a verification's rows up to the last accepted draft."""

    first_position: int
    rows: Any  # (n, d) tensor


@dataclass
class RunnerOutput:
    """Per scheduled request, in the order of SchedulerOutput.scheduled."""

    request_ids: list[str]
    # New tokens per request: [] for a prefill chunk that did not reach the end of the prompt; with
    # k drafts, the accepted drafts and then the target's own token (1 to k + 1 tokens).
    sampled_token_ids: list[list[int]]
    # Optional per request: one entry per sampled token, when logprobs were asked.
    logprobs: list[list[SampledLogprobs] | None] | None = None
    # Optional per request: the prompt positions whose logprobs this step computed (prompt_logprobs).
    prompt_logprobs: list[PromptLogprobs | None] | None = None
    # Optional per request: its HiddenRows, only for a runner asked to expose them (Medusa, EAGLE).
    hidden_states: list[HiddenRows | None] | None = None
