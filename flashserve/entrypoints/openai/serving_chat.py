"""POST /v1/chat/completions on AsyncLLMEngine (app.py routes it here): messages and tools →
the chat template's prompt → SamplingParams → a chat.completion object or its server-sent-event
chunks, with tool calls read from the output as it grows (tool_choice.py, tool_call_reader.py).
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from flashserve.engine.async_engine import AsyncLLMEngine
from flashserve.entrypoints.openai.beams import check_beam_request
from flashserve.entrypoints.openai.protocol import ChatCompletionRequest
from flashserve.entrypoints.openai.serving_base import ServingBase, error_body, sampling_params, sse_chunk
from flashserve.entrypoints.openai.tool_call_events import ToolCall, joined
from flashserve.entrypoints.openai.tool_choice import ToolPlan, ToolSupport, plan_tools
from flashserve.entrypoints.openai.tool_prompt import template_messages
from flashserve.errors import InvalidRequestError
from flashserve.outputs import CompletionOutput


class ChatServing(ServingBase):
    """chat(req): a response dict, or an async iterator of SSE lines when req.stream."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, tool_call_parser: str | None = None):
        super().__init__(engine, model_name)
        self.tool_support = ToolSupport.for_tokenizer(self.tokenizer, tool_call_parser)

    def _chat_prompt(self, req: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
        messages, tools = template_messages(req.messages, plan.tools, self.tool_support.native)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _chat_logprobs(self, token_ids, logprobs, top: int) -> dict | None:
        if logprobs is None:
            return None
        content = []
        for tok, entry in zip(token_ids, logprobs):
            s = self._token_str(tok)
            content.append({
                "token": s, "logprob": entry[tok].logprob if tok in entry else None, "bytes": list(s.encode()),
                "top_logprobs": [{"token": self._token_str(t), "logprob": lp.logprob,
                                  "bytes": list(self._token_str(t).encode())}
                                 for t, lp in entry.items() if lp.rank <= top],
            })
        return {"content": content}

    async def chat(self, req: ChatCompletionRequest):
        plan = plan_tools(req, self.tool_support)
        if req.use_beam_search:
            check_beam_request(req, req.logprobs)
        ids = self._chat_prompt(req, plan)
        max_tokens = self._check_lengths(ids, req.max_completion_tokens or req.max_tokens)
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                 guided=plan.guided)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        readers = [plan.new_reader() for _ in range(req.n)]
        if req.stream:
            return self._stream_chat(req, ids, params, rid, created, readers)
        events: list[list] = [[] for _ in readers]
        async for out, new in self._read_chat(rid, ids, params, req.priority, readers):
            for i, e in new.items():
                events[i] += e
        choices = []
        for c in out.outputs:
            content, calls = joined(events[c.index])
            message, finish = {"role": "assistant", "content": content}, c.finish_reason
            if calls:
                message["content"] = content or None
                message["tool_calls"] = [tool_call_json(call) for call in calls]
                finish = tool_finish_reason(finish, readers[c.index].complete)
            choices.append({"index": c.index, "message": message, "finish_reason": finish,
                            "logprobs": self._chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0)})
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self._usage([out])}

    async def _read_chat(self, rid, ids, params, priority, readers) -> AsyncIterator[tuple]:
        """(output, {sample index: events its reader read}) each time the engine gives an output.
        A sample whose reader is complete (parallel_tool_calls=false: it has its one call) ends
        there on its own (the others go on): the model spends no more tokens on it, its KV
        blocks are freed, and every later output holds it as it was then (text, tokens, logprobs).
        Once every reader is complete the request ends."""
        gen = self._outputs(ids, params, priority, request_id=rid)
        settled: dict[int, CompletionOutput] = {}  # sample → its output when its reader completed
        try:
            async for out in gen:
                events = {c.index: [] for c in out.outputs}
                for c in out.outputs:
                    if c.index in settled:
                        continue
                    events[c.index] = readers[c.index].feed(c.text, c.finish_reason is not None)
                    if readers[c.index].complete:
                        settled[c.index] = c
                        if not out.finished and c.finish_reason is None and len(settled) < len(readers):
                            self.engine.end_sample(rid, c.index)
                out = replace(out, outputs=tuple(settled.get(c.index, c) for c in out.outputs))
                yield out, events
                if not out.finished and len(settled) == len(readers):
                    self.engine.end(rid)
                    return
        finally:
            await gen.aclose()

    async def _stream_chat(self, req, ids, params, rid, created, readers) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            return sse_chunk(rid, "chat.completion.chunk", created, self.model_name, choices, usage)

        called = [False] * req.n  # the output holds a tool call
        ended = [False] * req.n  # its finish reason was sent
        toks = [0] * req.n  # tokens whose logprobs were sent
        final = None
        reading = self._read_chat(rid, ids, params, req.priority, readers)
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(req.n)])
            async for out, events in reading:
                final = out
                rounds: list[list[dict]] = []  # rounds[k]: the k-th delta of each output that has one
                for c in out.outputs:
                    i, finish = c.index, c.finish_reason
                    if ended[i]:
                        continue
                    deltas = stream_deltas(events[i])
                    called[i] = called[i] or any("tool_calls" in d for d in deltas)
                    if called[i]:
                        finish = tool_finish_reason(finish, readers[i].complete)
                    if not deltas and finish is None:
                        continue  # nothing settled: the logprobs wait for the next delta
                    ended[i] = finish is not None
                    lp = None
                    if c.logprobs is not None and len(c.token_ids) > toks[i]:
                        lp = self._chat_logprobs(c.token_ids[toks[i]:], c.logprobs[toks[i]:], req.top_logprobs or 0)
                    toks[i] = len(c.token_ids)
                    deltas = deltas or [{}]
                    for k, delta in enumerate(deltas):
                        if k == len(rounds):
                            rounds.append([])
                        rounds[k].append({"index": i, "delta": delta, "logprobs": lp if k == 0 else None,
                                          "finish_reason": finish if k == len(deltas) - 1 else None})
                for choices in rounds:
                    yield chunk(choices)
            if req.stream_options and req.stream_options.include_usage and final is not None:
                yield chunk([], self._usage([final]))
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
        finally:
            await reading.aclose()


def stream_deltas(events) -> list[dict]:
    """A reader's events → the deltas a stream sends, as OpenAI sends them: a call's first delta
    has its index, id, type and name with empty arguments, the next ones its index and a piece
    of the arguments each."""
    deltas: list[dict] = []
    for e in events:
        if e.kind == "content":
            deltas.append({"content": e.text})
        elif e.kind == "call":
            deltas.append({"tool_calls": [{"index": e.index, **tool_call_json(ToolCall(e.text, ""))}]})
        else:
            deltas.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return deltas


def tool_call_json(call) -> dict:
    """A ToolCall as OpenAI returns it, with a fresh id."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def tool_finish_reason(engine_reason: str | None, complete: bool) -> str | None:
    """The finish reason of an output that holds tool calls: "tool_calls" when the model ended
    its turn or the reader has all the calls it takes (complete), "length" when it was cut short
    (its calls may be incomplete)."""
    return "tool_calls" if engine_reason == "stop" or complete else engine_reason

