"""Beam search on the server (vLLM's use_beam_search, length_penalty, early_stopping): what a
request may combine it with, and the search of each prompt through the async engine.

The beams are greedy and the n best are known only at the end: a stream sends them then, in
one go. A beam request has no per-token logprobs (a beam's tokens are not each sampled from
one distribution), and stop strings would cut a sequence the search scored whole. A grammar
(response_format, guided_*, a forced tool call) applies to every beam (engine/beam_search.py)."""
from __future__ import annotations

from collections.abc import AsyncIterator

from flashserve.engine.beam_search import BeamSearchParams, beam_request_output, beam_search_async
from flashserve.errors import InvalidRequestError
from flashserve.outputs import RequestOutput
from flashserve.sampling_params import SamplingParams


def check_beam_request(req, logprobs: bool) -> None:
    """InvalidRequestError (HTTP 400) naming what use_beam_search cannot be combined with."""
    if logprobs:
        raise InvalidRequestError("use_beam_search gives no logprobs: a beam's tokens are not sampled one by one")
    if req.stop:
        raise InvalidRequestError("use_beam_search does not take stop strings: they would cut a scored sequence")


async def beam_outputs(engine, ids: list[int], params: SamplingParams, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
    """A prompt's beam search as a stream of outputs: one, finished, at its end, holding the n best
    of max(n, best_of) beams, best first, each under the request's grammar if it has one.
    `engine`: the AsyncLLMEngine; the search runs beside the other requests."""
    engine.check_room()
    core = engine.engine
    bp = BeamSearchParams(params.beam_width, params.max_tokens, params.length_penalty, params.early_stopping,
                          params.guided_decoding)
    result = await beam_search_async(engine, ids, bp, core.eos_token_ids, priority)
    out = beam_request_output(core, core.next_request_id(), None, ids, result, params.n, params.skip_special_tokens)
    if engine.on_finished:  # one finished request for the metrics (its steps are not counted)
        engine.on_finished(out)
    yield out
