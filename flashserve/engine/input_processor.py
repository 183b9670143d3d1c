"""Prompt (text, token ids or chat messages) → validated core Requests, one per sample (best_of or n)."""
from __future__ import annotations

from collections.abc import Sequence

from flashserve.core.request import Request
from flashserve.errors import InvalidRequestError

PromptType = str | Sequence[int] | dict


class InputProcessor:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Returns (prompt text or None, prompt token ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, self._check_ids(prompt)

    def _check_ids(self, ids) -> list[int]:
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def make_requests(self, request_id: str, prompt_ids: list[int], params, priority: int = 0) -> list[Request]:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens but the context is {self.max_model_len} tokens "
                f"(at least one must be left for the output)"
            )
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids contains {bad[0]}, outside the vocabulary")
        n = params.num_samples if not params.use_beam_search else 1
        return [
            Request(
                request_id=child_id(request_id, i, n),
                prompt_token_ids=prompt_ids,
                sampling_params=_child_params(params, i, n > params.n),
                eos_token_ids=self.eos_token_ids,
                priority=priority,
                parent_id=child_id(request_id, 0, n) if i else None,
            )
            for i in range(n)
        ]


def child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


def _child_params(params, index: int, ranked: bool):
    """Sample i of a seeded n>1 request uses seed + i, so the n samples differ but stay reproducible.
    Only sample 0 computes the prompt logprobs (they are the same for all samples). Samples
    ranked for best_of need the logprob of each sampled token even if the user asked none."""
    needs_logprobs = ranked and params.logprobs is None
    if not needs_logprobs and (index == 0 or (params.seed is None and params.prompt_logprobs is None)):
        return params
    child = params.clone()
    if params.seed is not None:
        child.seed = params.seed + index
    if index:
        child.prompt_logprobs = None
    if needs_logprobs:
        child.logprobs = 0
    return child
