"""OpenAI completions and chat completions on top of AsyncLLMEngine: request → SamplingParams,
outputs → response objects or server-sent-event chunks."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from flashserve.engine.async_engine import AsyncLLMEngine
from flashserve.errors import InvalidRequestError
from flashserve.entrypoints.openai.beams import beam_outputs, check_beam_request
from flashserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from flashserve.entrypoints.openai.tool_choice import ToolPlan, ToolSupport, plan_tools
from flashserve.entrypoints.openai.tool_call_events import ToolCall, joined
from flashserve.entrypoints.openai.tool_prompt import template_messages
from flashserve.outputs import CompletionOutput
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


class Serving:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, tool_call_parser: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.engine.tokenizer
        self.tool_support = ToolSupport.for_tokenizer(self.tokenizer, tool_call_parser)
        self.max_model_len = engine.engine.config.scheduler.max_model_len

    # ---- shared ------------------------------------------------------------------------------
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

    # ---- completions -------------------------------------------------------------------------
    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts = [self.tokenizer.encode(p)]
        elif p and isinstance(p[0], int):
            prompts = [list(p)]
        elif p and isinstance(p[0], str):
            prompts = [self.tokenizer.encode(s) for s in p]
        else:
            prompts = [list(x) for x in p]
        if not prompts:
            raise InvalidRequestError("the prompt is empty")
        return prompts

    def _completion_logprobs(self, token_ids, entries, offset: int = 0) -> dict | None:
        """OpenAI's legacy logprobs object; an entry is None for the first prompt token under echo."""
        if entries is None:
            return None
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset
        for tok, entry in zip(token_ids, entries):
            s = self._token_str(tok)
            tokens.append(s)
            lps.append(entry[tok].logprob if entry and tok in entry else None)
            tops.append({self._token_str(t): lp.logprob for t, lp in entry.items()} if entry is not None else None)
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _echo_choice(self, out, index: int, logprobs: bool) -> dict:
        """The prompt as the start of a choice (echo), with its prompt logprobs when logprobs were asked."""
        text = self.tokenizer.decode(out.prompt_token_ids)
        lp = self._completion_logprobs(out.prompt_token_ids, out.prompt_logprobs) if logprobs else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": None}

    @staticmethod
    def _join_logprobs(head: dict | None, tail: dict | None) -> dict | None:
        if head is None or tail is None:
            return head or tail
        return {k: head[k] + tail[k] for k in head}

    async def completions(self, req: CompletionRequest):
        if req.use_beam_search:
            check_beam_request(req, logprobs=req.logprobs is not None)
        if req.stream and req.best_of is not None and req.best_of > req.n and not req.use_beam_search:
            raise InvalidRequestError("best_of > n cannot stream: the n best are known only at the end")
        prompts = self._completion_prompts(req)
        max_tokens = min(self._check_lengths(ids, req.max_tokens) for ids in prompts)
        echo_logprobs = req.logprobs if req.echo else None  # echo + logprobs scores the prompt too
        params = sampling_params(req, max_tokens, req.logprobs, echo_logprobs, req.best_of)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return self._stream_completions(req, prompts, params, rid, created)
        outputs = await self._run(prompts, params, req.priority)
        choices = []
        for pi, out in enumerate(outputs):
            head = self._echo_choice(out, pi, req.logprobs is not None) if req.echo else None
            for c in out.outputs:
                lp = self._completion_logprobs(c.token_ids, c.logprobs, len(head["text"]) if head else 0)
                text = c.text
                if head:
                    text, lp = head["text"] + text, self._join_logprobs(head["logprobs"], lp)
                choices.append({"index": pi * req.n + c.index, "text": text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self._usage(outputs)}

    async def _stream_completions(self, req, prompts, params, rid, created) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            return sse_chunk(rid, "text_completion", created, self.model_name, choices, usage)

        queue: asyncio.Queue = asyncio.Queue()
        finals: dict[int, object] = {}

        async def pump(pi, ids):
            gen = self._outputs(ids, params, req.priority)
            try:
                async for out in gen:
                    await queue.put((pi, out))
            except Exception as exc:
                await queue.put((pi, exc))
            finally:
                await gen.aclose()

        tasks = [asyncio.create_task(pump(pi, ids)) for pi, ids in enumerate(prompts)]
        sent: dict[tuple[int, int], int] = {}  # (prompt, sample) → chars sent
        toks_sent: dict[tuple[int, int], int] = {}
        echo_len: dict[int, int] = {}  # prompt → length of its echoed text (offsets continue after it)
        ended: set[tuple[int, int]] = set()  # samples whose finish reason was sent
        try:
            while len(finals) < len(prompts):
                pi, out = await queue.get()
                if isinstance(out, Exception):
                    yield f"data: {json.dumps(error_body(str(out), 'server_error'))}\n\n"
                    return
                if req.echo and pi not in echo_len:  # at its first output, when the prompt logprobs exist
                    echo = [self._echo_choice(out, pi * req.n + i, req.logprobs is not None) for i in range(req.n)]
                    echo_len[pi] = len(echo[0]["text"])
                    yield chunk(echo)
                choices = []
                for c in out.outputs:
                    key = (pi, c.index)
                    if key in ended:
                        continue
                    delta = c.text[sent.get(key, 0):]
                    new_toks = len(c.token_ids) - toks_sent.get(key, 0)
                    if not delta and c.finish_reason is None:
                        continue
                    lp = None
                    if c.logprobs is not None and new_toks > 0:
                        start = toks_sent.get(key, 0)
                        lp = self._completion_logprobs(c.token_ids[start:], c.logprobs[start:],
                                                      echo_len.get(pi, 0) + sent.get(key, 0))
                    sent[key], toks_sent[key] = len(c.text), len(c.token_ids)
                    if c.finish_reason is not None:
                        ended.add(key)
                    choices.append({"index": pi * req.n + c.index, "text": delta, "logprobs": lp,
                                    "finish_reason": c.finish_reason})
                if choices:
                    yield chunk(choices)
                if out.finished:
                    finals[pi] = out
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], self._usage(list(finals.values())))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

    # ---- chat --------------------------------------------------------------------------------
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


def sse_chunk(rid: str, kind: str, created: int, model: str, choices: list, usage: dict | None = None) -> str:
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
