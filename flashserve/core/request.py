"""A request as the scheduler sees it: token ids, progress, and the KV blocks it holds.

Owned by the scheduler; the engine creates it, the output processor reads it.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"  # EOS, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or context limit
    FINISHED_ABORTED = "abort"
    FINISHED_ENDED = "ended"  # the caller has what it wants of it (LLMEngine.end_sample)
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # flashserve.sampling_params.SamplingParams (kept untyped: no upward import)
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first under the "priority" policy
    # Sample i > 0 of an n > 1 (or best_of) request: the id of sample 0, whose computed prompt it forks;
    # a beam's step: the held request of the beam it extends, whose computed tokens it forks.
    parent_id: str | None = None
    # Beam search sets this (never a user parameter): when the request finishes normally its
    # blocks are held (Scheduler.held) until release_held, so the next round's beams can fork them.
    hold_blocks: bool = False

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # all_token_ids = prompt + output; kept as one list so the runner can index it without copies.
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0  # of those, how many came from the prefix cache
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Speculative decoding: draft tokens proposed for the next step (the scheduler takes them into
    # that step's token budget and clears them), and the running count of drafts verified / accepted.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_token_probs: Any = None  # the drafts' proposal distribution when they were sampled (opaque here)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Which of the scheduler's micro-batches the request runs in (pipeline parallelism keeps several
    # in flight; a request is in one, so its next step waits for its previous one's tokens).
    micro_batch: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def skip_reading_prefix_cache(self) -> bool:
        """Prompt logprobs need the logits of every prompt position, so none may come from the
        cache (vLLM does the same); once an output token exists they have all been reported."""
        return self.sampling_params.prompt_logprobs is not None and not self.output_token_ids

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
