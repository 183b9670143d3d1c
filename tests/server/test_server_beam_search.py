"""Beam search over real HTTP (vLLM's use_beam_search) with the official openai client: the
server's beams equal the offline engine's (a second code path, LLM.generate), also under a
grammar (guided_regex, response_format, a forced tool call), a client that leaves mid-search
leaves no KV block held, a stream sends the beams at the end, and what a beam request cannot
give (logprobs, stop strings) gets a 400 naming it."""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from flashserve import SamplingParams
from tests.server.test_tool_calling import ASK, TOOLS, client, metric

PROMPT = "The three most important inventions in history are"


def test_completions_beams_equal_offline_beams(server, smollm2_default_llm):
    base, model = server
    generated = metric(base, "flashserve_generation_tokens_total")
    r = client(base).completions.create(model=model, prompt=PROMPT, n=2, best_of=3, max_tokens=10,
                                        extra_body={"use_beam_search": True, "length_penalty": 0.8})
    (ref,) = smollm2_default_llm.generate([PROMPT], SamplingParams(use_beam_search=True, n=2, best_of=3, temperature=0,
                                                                    max_tokens=10, length_penalty=0.8), use_tqdm=False)
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == \
        [(c.index, c.text, c.finish_reason) for c in ref.outputs]
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in ref.outputs)
    assert metric(base, "flashserve_kv_cache_blocks_used") == 0  # every round's held blocks were released
    # counted once, as the returned beams (not as 10 rounds of one-token steps)
    assert metric(base, "flashserve_generation_tokens_total") - generated == r.usage.completion_tokens


def test_chat_beams_equal_offline_beams_and_read_tool_calls(server, smollm2_default_llm):
    """The chat prompt rendered as the server renders it (tools included), searched offline."""
    base, model = server
    kw = dict(model=model, messages=ASK, n=2, max_tokens=24, extra_body={"use_beam_search": True})
    r = client(base).chat.completions.create(**kw)
    tok = smollm2_default_llm.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template([m for m in ASK], add_generation_prompt=True), add_special_tokens=False)
    (ref,) = smollm2_default_llm.generate([{"prompt_token_ids": ids}], SamplingParams(
        use_beam_search=True, n=2, temperature=0, max_tokens=24), use_tqdm=False)
    assert r.usage.prompt_tokens == len(ids)
    assert [(c.message.content, c.finish_reason) for c in r.choices] == [(c.text, c.finish_reason) for c in ref.outputs]
    # with tools under "auto" the beams' text goes through the tool-call reader like any output
    tools = client(base).chat.completions.create(tools=TOOLS, **kw)
    for choice in tools.choices:
        assert choice.message.content or choice.message.tool_calls


def test_client_leaving_a_beam_search_leaves_no_block_held(server):
    """4 beams x 300 tokens of a count (no beam ends early at EOS, as beams of PROMPT can: one near-tie
    made them stop after 13 tokens) take ~4.5 s on 2 cores; the client leaves after 1.5 s. The search
    stops there (the engine samples far fewer than the 1200 tokens of the whole search) and no block
    of its steps is left held."""
    base, model = server
    body = {"model": model, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "n": 4, "max_tokens": 300,
            "use_beam_search": True}
    before = metric(base, "flashserve_engine_sampled_tokens")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/completions", json=body, timeout=1.5)
    deadline = time.time() + 30
    while metric(base, "flashserve_kv_cache_blocks_used") and time.time() < deadline:
        time.sleep(0.1)
    assert metric(base, "flashserve_kv_cache_blocks_used") == 0
    assert metric(base, "flashserve_engine_sampled_tokens") - before < 4 * 300
    assert metric(base, "flashserve_num_requests_running") == 0
    r = client(base).completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"


REGEX = r"The answer is [0-9]{1,3}\.( Yes| Indeed)?"
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "blue", "green", "yellow"]}},
         "required": ["color"], "additionalProperties": False}


def test_beams_under_a_grammar_equal_offline_beams_and_follow_it(server, smollm2_default_llm):
    """guided_regex on completions, a json_schema response_format and a forced tool call on chat:
    every beam follows the grammar, and the beams are the offline engine's (whose search under a
    grammar tests/engine/test_beam_search.py checks against transformers' constrained beams)."""
    import jsonschema_rs

    from flashserve.sampling_params import GuidedDecodingParams
    from tests.server.test_tool_calling import assert_valid_calls

    base, model = server
    c = client(base)
    prompt = "Q: What is 2+2?\nA:"
    r = c.completions.create(model=model, prompt=prompt, n=2, best_of=3, max_tokens=10,
                             extra_body={"use_beam_search": True, "guided_regex": REGEX})
    (ref,) = smollm2_default_llm.generate([prompt], SamplingParams(
        use_beam_search=True, n=2, best_of=3, temperature=0, max_tokens=10,
        guided_decoding=GuidedDecodingParams(regex=REGEX)), use_tqdm=False)
    assert [(ch.text, ch.finish_reason) for ch in r.choices] == [(o.text, o.finish_reason) for o in ref.outputs]
    assert all(re.fullmatch(REGEX, ch.text) for ch in r.choices if ch.finish_reason == "stop")
    assert r.choices[0].finish_reason == "stop"

    ask = [{"role": "user", "content": "Name a color."}]
    r = c.chat.completions.create(model=model, messages=ask, n=2, max_tokens=20, extra_body=BEAM, response_format={
        "type": "json_schema", "json_schema": {"name": "color", "schema": COLOR}})
    tok = smollm2_default_llm.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template(ask, add_generation_prompt=True), add_special_tokens=False)
    (ref,) = smollm2_default_llm.generate([{"prompt_token_ids": ids}], SamplingParams(
        use_beam_search=True, n=2, temperature=0, max_tokens=20, guided_decoding=GuidedDecodingParams(json=COLOR)),
        use_tqdm=False)
    assert [ch.message.content for ch in r.choices] == [o.text for o in ref.outputs]
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema_rs.validate(COLOR, json.loads(ch.message.content))

    r = c.chat.completions.create(model=model, messages=ASK, n=2, max_tokens=60, tools=TOOLS, tool_choice="required",
                                  extra_body=BEAM)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls"
        assert_valid_calls(ch.message.tool_calls, ["get_weather", "get_time"])
    assert metric(base, "flashserve_kv_cache_blocks_used") == 0


BEAM = {"use_beam_search": True}


def test_streamed_beams_come_at_the_end_as_the_reply_has_them(server):
    """A stream of beams sends each choice's whole text (or tool call) and finish reason once the
    search ends: the same as the reply not streamed, read by the openai client's stream helpers."""
    base, model = server
    c = client(base)
    kw = dict(model=model, prompt=PROMPT, n=2, best_of=3, max_tokens=8, extra_body=BEAM)
    whole = c.completions.create(**kw)
    texts, finish = {}, {}
    for chunk in c.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert [(texts[ch.index], finish[ch.index]) for ch in whole.choices] == \
        [(ch.text, ch.finish_reason) for ch in whole.choices]
    kw = dict(model=model, messages=ASK, max_tokens=60, tools=TOOLS, tool_choice="required", extra_body=BEAM)
    reply = c.chat.completions.create(**kw).choices[0]
    with c.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == reply.finish_reason == "tool_calls"
    assert [(t.function.name, t.function.arguments) for t in streamed.message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in reply.message.tool_calls]


@pytest.mark.parametrize("endpoint, body, named", [
    ("chat", dict(logprobs=True), "no logprobs"),
    ("completions", dict(logprobs=1), "no logprobs"),
    ("completions", dict(stop=["."]), "stop strings"),
    ("completions", dict(extra_body={**BEAM, "temperature": 0.7}), "temperature=0"),
])
def test_beams_with_what_beams_cannot_give_get_400(server, endpoint, body, named):
    base, model = server
    c = client(base)
    body = {"extra_body": BEAM, **body}
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            c.chat.completions.create(model=model, messages=ASK, max_tokens=5, **body)
        else:
            c.completions.create(model=model, prompt=PROMPT, max_tokens=5, **body)
    message = info.value.body.get("error", info.value.body)["message"]
    assert ("use_beam_search" in message or "beam search" in message) and named in message, message
