"""What the OpenAI endpoints share (serving_completions.py, serving_chat.py): a request's fields →
SamplingParams, the prompt's length checks against the context, the engine's outputs for a prompt,
usage counts, and the shapes of a server-sent event and an error body (app.py answers errors in it).
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from flashserve.engine.async_engine import AsyncLLMEngine
from flashserve.entrypoints.openai.beams import beam_outputs
from flashserve.errors import InvalidRequestError
from flashserve.sampling_params import GuidedDecodingParams, SamplingParams


def sampling_params(req, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                    best_of: int | None = None, guided: GuidedDecodingParams | None = None) -> SamplingParams:
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise InvalidRequestError("logit_bias keys must be token ids") from None
    try:
        return SamplingParams(
            n=req.n, best_of=best_of,
            temperature=(0.0 if req.use_beam_search else 1.0) if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or -1, min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty or 1.0, logit_bias=bias, seed=req.seed,
            max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop or [],
            stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
            guided_decoding=guided or guided_decoding(req), use_beam_search=req.use_beam_search,
            length_penalty=req.length_penalty, early_stopping=req.early_stopping,
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def guided_decoding(req) -> GuidedDecodingParams | None:
    """OpenAI's response_format or vLLM's guided_* fields → the request's one constraint, or None.
    Raises ValueError for a bad or doubled constraint."""
    given = {"json": req.guided_json, "regex": req.guided_regex, "choice": req.guided_choice,
             "grammar": req.guided_grammar}
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        given["json_object"] = True
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        if rf.json_schema.schema_ is None:
            given["json_object"] = True
        elif req.guided_json is not None:
            raise ValueError("give either response_format or guided_json, not both")
        else:
            given["json"] = rf.json_schema.schema_
    given = {k: v for k, v in given.items() if v is not None}
    return GuidedDecodingParams(**given) if given else None


class ServingBase:
    """One endpoint's hold on the engine; CompletionServing and ChatServing build on it."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.scheduler.max_model_len

    def _check_lengths(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens but the context is "
                                      f"{self.max_model_len} tokens")
        if max_tokens is not None and max_tokens > room:
            raise InvalidRequestError(f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds "
                                      f"the context of {self.max_model_len} tokens")
        return max_tokens if max_tokens is not None else room

    def _token_str(self, tok: int) -> str:
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def _outputs(self, ids, params, priority, request_id: str | None = None) -> AsyncIterator:
        """A prompt's RequestOutputs as they change: the engine's, or a beam search's one at its end."""
        if params.use_beam_search:
            return beam_outputs(self.engine, ids, params, priority)
        return self.engine.generate({"prompt_token_ids": ids}, params, request_id=request_id, priority=priority)

    async def _run(self, prompts_ids, params, priority) -> list:
        """Run several prompts concurrently; returns their final RequestOutputs."""
        async def one(ids):
            final = None
            async for out in self._outputs(ids, params, priority):
                final = out
            return final
        return await asyncio.gather(*(one(ids) for ids in prompts_ids))

    @staticmethod
    def _usage(outputs) -> dict:
        p = sum(len(o.prompt_token_ids) for o in outputs)
        c = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse_chunk(rid: str, kind: str, created: int, model: str, choices: list, usage: dict | None = None) -> str:
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
