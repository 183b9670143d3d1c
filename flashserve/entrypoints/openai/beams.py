"""Beam search on the server (vLLM's use_beam_search, length_penalty, early_stopping): what a
request may combine it with, and the search of each prompt through the async engine.

The beams are greedy and the n best are known only at the end, so a beam request does not
stream; it has no per-token logprobs (a beam's tokens are not each sampled from one
distribution), and stop strings would cut a sequence the search scored whole. A grammar
(response_format, guided_*, a forced tool call) applies to every beam (engine/beam_search.py)."""
from __future__ import annotations

import asyncio

from flashserve.engine.beam_search import BeamSearchParams, beam_request_output, beam_search_async
from flashserve.errors import InvalidRequestError
from flashserve.outputs import RequestOutput
from flashserve.sampling_params import SamplingParams


def check_beam_request(req, logprobs: bool) -> None:
    """InvalidRequestError (HTTP 400) naming what use_beam_search cannot be combined with."""
    if req.stream:
        raise InvalidRequestError("use_beam_search cannot stream: the best beams are known only at the end")
    if logprobs:
        raise InvalidRequestError("use_beam_search gives no logprobs: a beam's tokens are not sampled one by one")
    if req.stop:
        raise InvalidRequestError("use_beam_search does not take stop strings: they would cut a scored sequence")


async def run_beam_search(engine, prompts: list[list[int]], params: SamplingParams, priority: int = 0
                          ) -> list[RequestOutput]:
    """One finished RequestOutput per prompt: its n best of max(n, best_of) beams, best first, each
    under the request's grammar if it has one. `engine`: the AsyncLLMEngine; the searches run
    together, beside the other requests."""
    engine.check_room()
    core = engine.engine
    bp = BeamSearchParams(params.beam_width, params.max_tokens, params.length_penalty, params.early_stopping,
                          params.guided_decoding)

    async def one(ids: list[int]) -> RequestOutput:
        result = await beam_search_async(engine, ids, bp, core.eos_token_ids, priority)
        out = beam_request_output(core, core.next_request_id(), None, ids, result, params.n,
                                  params.skip_special_tokens)
        if engine.on_finished:  # one finished request for the metrics (its steps are not counted)
            engine.on_finished(out)
        return out

    return list(await asyncio.gather(*(one(ids) for ids in prompts)))
