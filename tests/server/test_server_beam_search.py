"""Beam search over real HTTP (vLLM's use_beam_search) with the official openai client: the
server's beams equal the offline engine's (a second code path, LLM.generate), a client that
leaves mid-search leaves no KV block held, and beams with a grammar or with what a beam request
cannot give (a stream, logprobs, stop strings) get a 400 naming both."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from flashserve import SamplingParams
from tests.server.test_tool_calling import ASK, TOOLS, client, metric

PROMPT = "The three most important inventions in history are"


def test_completions_beams_equal_offline_beams(server, smollm2_default_llm):
    base, model = server
    r = client(base).completions.create(model=model, prompt=PROMPT, n=2, best_of=3, max_tokens=10,
                                        extra_body={"use_beam_search": True, "length_penalty": 0.8})
    (ref,) = smollm2_default_llm.generate([PROMPT], SamplingParams(use_beam_search=True, n=2, best_of=3, temperature=0,
                                                                    max_tokens=10, length_penalty=0.8), use_tqdm=False)
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == \
        [(c.index, c.text, c.finish_reason) for c in ref.outputs]
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in ref.outputs)
    assert metric(base, "flashserve_kv_cache_blocks_used") == 0  # every round's held blocks were released


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
    """4 beams x 300 tokens take ~5.5 s on 2 cores; the client leaves after 1.5 s. The search stops
    there (the engine samples far fewer than the 1200 tokens of the whole search) and no block of
    its steps is left held."""
    base, model = server
    body = {"model": model, "prompt": PROMPT, "n": 4, "max_tokens": 300, "use_beam_search": True}
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


BEAM = {"use_beam_search": True}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("endpoint, body, named", [
    ("chat", dict(response_format={"type": "json_object"}), "response_format 'json_object'"),
    ("chat", dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
     "response_format 'json_schema'"),
    ("chat", dict(extra_body={**BEAM, "guided_regex": "[ab]+"}), "guided_regex"),
    ("chat", dict(extra_body={**BEAM, "guided_choice": ["yes", "no"]}), "guided_choice"),
    ("chat", dict(tools=TOOLS, tool_choice="required"), "tool_choice 'required'"),
    ("chat", dict(tools=TOOLS, tool_choice=NAMED), "tool_choice naming the function 'get_weather'"),
    ("completions", dict(extra_body={**BEAM, "guided_json": {"type": "object"}}), "guided_json"),
    ("completions", dict(extra_body={**BEAM, "guided_grammar": 'root ::= "a"'}), "guided_grammar"),
    ("chat", dict(stream=True), "cannot stream"),
    ("chat", dict(logprobs=True), "no logprobs"),
    ("completions", dict(logprobs=1), "no logprobs"),
    ("completions", dict(stop=["."]), "stop strings"),
    ("completions", dict(extra_body={**BEAM, "temperature": 0.7}), "temperature=0"),
])
def test_beams_with_a_grammar_or_what_beams_cannot_give_get_400(server, endpoint, body, named):
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
