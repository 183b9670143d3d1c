"""Beam search on the server (vLLM's use_beam_search, length_penalty, early_stopping): what a
request may combine it with, and the search of each prompt through the async engine.

The beams are greedy and the n best are known only at the end, so a beam request does not
stream; it has no per-token logprobs (a beam's tokens are not each sampled from one
distribution), and stop strings would cut a sequence the search scored whole. A grammar
(response_format, guided_*, a forced tool call) is refused: each beam would need the grammar's
state after its own tokens, and every step of a beam starts as a new request."""
from __future__ import annotations

import asyncio

from flashserve.engine.beam_search import BeamSearchParams, beam_request_output, beam_search_async
from flashserve.errors import InvalidRequestError
from flashserve.outputs import RequestOutput


def check_beam_request(req, logprobs: bool, forced_call: str | None = None) -> None:
    """InvalidRequestError (HTTP 400) naming what use_beam_search cannot be combined with.
    forced_call: the tool_choice that forces a call through a grammar, if any."""
    grammar = req.output_constraint() or forced_call
    if grammar is not None:
        raise InvalidRequestError(f"use_beam_search cannot be combined with {grammar}: beam search does not "
                                  "support guided decoding (each beam would need the grammar's state)")
    if req.stream:
        raise InvalidRequestError("use_beam_search cannot stream: the best beams are known only at the end")
    if logprobs:
        raise InvalidRequestError("use_beam_search gives no logprobs: a beam's tokens are not sampled one by one")
    if req.stop:
        raise InvalidRequestError("use_beam_search does not take stop strings: they would cut a scored sequence")


def forced_call_text(tool_choice) -> str | None:
    """The tool_choice that forces a call (through a grammar), as a request names it."""
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    if tool_choice == "required":
        return "tool_choice 'required'"
    return f"tool_choice naming the function {tool_choice.function.name!r}"


async def run_beam_search(engine, prompts: list[list[int]], width: int, n: int, max_tokens: int, req,
                          skip_special_tokens: bool = True) -> list[RequestOutput]:
    """One finished RequestOutput per prompt: its n best of `width` beams, best first. `engine`:
    the AsyncLLMEngine; the searches run together, beside the other requests."""
    engine.check_room()
    core = engine.engine
    bp = BeamSearchParams(width, max_tokens, req.length_penalty, req.early_stopping)

    async def one(ids: list[int]) -> RequestOutput:
        result = await beam_search_async(engine, ids, bp, core.eos_token_ids, req.priority)
        return beam_request_output(core, core.next_request_id(), None, ids, result, n, skip_special_tokens)

    return list(await asyncio.gather(*(one(ids) for ids in prompts)))
