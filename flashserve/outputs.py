"""User-facing results of generation (immutable snapshots, vLLM's shape)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None = None
    # Per generated token: {token_id: Logprob} holding the sampled token and the top-N.
    logprobs: tuple[dict[int, Logprob], ...] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "ended" | "error" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    # Per prompt token when prompt_logprobs was asked: None for the first, then {token_id: Logprob}
    # holding the prompt token (rank in the whole vocabulary) and the top-N.
    prompt_logprobs: tuple[dict[int, Logprob] | None, ...] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)  # arrival/first-token/finish times (monotonic seconds)
