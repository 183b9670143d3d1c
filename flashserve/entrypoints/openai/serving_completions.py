"""POST /v1/completions on AsyncLLMEngine (app.py routes it here): prompts (text, token ids, or lists
of either) → SamplingParams → a text_completion object or its server-sent-event chunks, with echo and
OpenAI's legacy logprobs object."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from flashserve.entrypoints.openai.beams import check_beam_request
from flashserve.entrypoints.openai.protocol import CompletionRequest
from flashserve.entrypoints.openai.serving_base import ServingBase, error_body, sampling_params, sse_chunk
from flashserve.errors import InvalidRequestError


class CompletionServing(ServingBase):
    """completions(req): a response dict, or an async iterator of SSE lines when req.stream."""

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

