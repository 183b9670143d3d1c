"""Tool calling over real HTTP with the official openai client.

Forced calls (tool_choice "required" or a named function) must parse into a declared tool whose
arguments validate against its parameters schema (jsonschema_rs, an independent validator);
"auto" on Qwen2.5-Coder-0.5B must find the call the model makes; a conversation that sends calls
and results back must render as transformers' own renderer renders it (token counts compared);
bad tools or tool_choice get a 400 naming the problem."""
from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema_rs
import openai
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tests.server.conftest import serving

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]

# The conversation sent back after a call: the assistant's call and the tool's result.
CALL = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
RESULT = '{"temperature_c": 31, "sky": "sunny"}'
FOLLOW_UP = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "call_0", "content": RESULT}]


def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def assert_valid_calls(tool_calls, names):
    assert tool_calls, "no tool call"
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema_rs.validate(SCHEMAS[call.function.name], json.loads(call.function.arguments))


def streamed(c, **kw):
    """The streamed reply accumulated by the openai client's own stream helper."""
    with c.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        return stream.get_final_completion().choices[0]


@pytest.mark.parametrize("choice, names", [
    ("required", ["get_weather", "get_time"]),
    ({"type": "function", "function": {"name": "get_time"}}, ["get_time"]),
], ids=["required", "named"])
def test_forced_call_is_a_valid_call(server, choice, names):
    base, model = server
    c = client(base)
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=60)
    r = c.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.content is None
    assert_valid_calls(r.message.tool_calls, names)
    s = streamed(c, **kw)
    assert s.finish_reason == "tool_calls"
    assert_valid_calls(s.message.tool_calls, names)
    assert [(t.function.name, t.function.arguments) for t in s.message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in r.message.tool_calls]


def stream_calls(stream) -> tuple[dict, dict]:
    """Each choice's calls from a raw stream of chunks, as {index: (name, [argument pieces])}, and
    each choice's finish reason. Checks every delta's shape as OpenAI sends it: a call's first
    delta has its index, id, type and name and empty arguments, the later ones only the index and
    a piece of the arguments."""
    calls, finish = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            got = calls.setdefault(choice.index, {})
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
            assert not choice.delta.content, "a tool call's text leaked into the content"
            for d in choice.delta.tool_calls or ():
                if d.index not in got:
                    assert d.index == len(got), "calls are indexed 0, 1, ... in order"
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    assert d.function.arguments == ""
                    got[d.index] = (d.function.name, [])
                else:
                    assert d.id is None and d.type is None and d.function.name is None
                    assert d.function.arguments
                    got[d.index][1].append(d.function.arguments)
    return calls, finish


TWO_CITIES = [{"role": "user", "content": "Get the weather in Paris and in London."}]


def test_streamed_arguments_come_in_pieces_that_join_into_the_calls(server):
    """SmolLM2 answers this with two calls under "required" (measured at temperature 0). Streamed,
    each call's arguments arrive in several pieces, after a first delta that names the call; the
    pieces join into the arguments of the same request not streamed; every output of n=2 has its own."""
    base, model = server
    c = client(base)
    kw = dict(model=model, messages=TWO_CITIES, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80, n=2)
    whole = c.chat.completions.create(**kw)
    calls, finish = stream_calls(c.chat.completions.create(stream=True, **kw))
    assert sorted(calls) == [0, 1] and finish == {0: "tool_calls", 1: "tool_calls"}
    for choice in whole.choices:
        expected = [(t.function.name, t.function.arguments) for t in choice.message.tool_calls]
        assert len(expected) >= 2, expected
        got = calls[choice.index]
        assert [(name, "".join(pieces)) for name, pieces in got.values()] == expected
        assert all(len(pieces) >= 2 for _, pieces in got.values()), got
        assert_valid_calls(choice.message.tool_calls, ["get_weather", "get_time"])


def test_parallel_tool_calls_false_makes_one_call(server):
    base, model = server
    c = client(base)
    kw = dict(model=model, messages=TWO_CITIES, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80,
              parallel_tool_calls=False)
    r = c.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls" and len(r.message.tool_calls) == 1
    s = streamed(c, **kw)
    assert [(t.function.name, t.function.arguments) for t in s.message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in r.message.tool_calls]


# Under "auto", a regex that makes SmolLM2 write two Hermes calls and then a run of text: the
# output the model would give without parallel_tool_calls=false.
FIRST_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
TWO_CALLS_AND_TEXT = (FIRST_CALL + '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}'
                      '\n</tool_call>\n' + "Both calls are on their way, with their answers to follow. " * 4)


def literal_regex(text: str) -> str:
    return "".join("\\" + ch if ch in "\\.^$*+?{}[]|()" else "\\n" if ch == "\n" else ch for ch in text)


def metric(base, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(f"{base}/metrics", timeout=10).text, re.M).group(1))


def sampled_by(base, ask) -> tuple[object, float]:
    """(ask()'s result, tokens the engine sampled for it): read once no request is left running,
    so that the steps in flight when it was ended are counted too."""
    before = metric(base, "flashserve_engine_sampled_tokens")
    result = ask()
    deadline = time.time() + 30
    while metric(base, "flashserve_num_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    return result, metric(base, "flashserve_engine_sampled_tokens") - before


def test_parallel_tool_calls_false_ends_the_request_after_the_first_call(server):
    """The model would write two calls and more text (the regex); with parallel_tool_calls=false
    the reply holds the first call alone, finish_reason "tool_calls", and the engine stops
    sampling within a few tokens of that call's closing brace, streamed or not."""
    from flashserve.tokenizer.tokenizer import Tokenizer

    base, model = server
    c = client(base)
    kw = dict(model=model, messages=TWO_CITIES, tools=TOOLS, temperature=0, max_tokens=200,
              extra_body={"guided_regex": literal_regex(TWO_CALLS_AND_TEXT)})
    both, sampled_both = sampled_by(base, lambda: c.chat.completions.create(**kw))
    assert [t.function.name for t in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    first_call_tokens = len(Tokenizer.from_model_path(model).encode(FIRST_CALL, add_special_tokens=False))
    assert sampled_both >= both.usage.completion_tokens > first_call_tokens + 40
    slack = 4  # steps that ran between the call's last token and the abort
    for ask in (lambda: c.chat.completions.create(parallel_tool_calls=False, **kw),
                lambda: streamed(c, parallel_tool_calls=False, stream_options={"include_usage": True}, **kw)):
        one, sampled = sampled_by(base, ask)
        choice = one.choices[0] if hasattr(one, "choices") else one
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        assert [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls] == \
            [("get_weather", {"city": "Paris"})]
        assert first_call_tokens <= sampled <= first_call_tokens + slack, (sampled, first_call_tokens)
    usage = c.chat.completions.create(parallel_tool_calls=False, **kw).usage
    assert first_call_tokens <= usage.completion_tokens <= first_call_tokens + slack


def test_tool_choice_none_renders_and_reads_no_tools(server):
    base, model = server
    c = client(base)
    kw = dict(model=model, messages=ASK, temperature=0, max_tokens=1)
    plain = c.chat.completions.create(**kw)
    none = c.chat.completions.create(tools=TOOLS, tool_choice="none", **kw)
    auto = c.chat.completions.create(tools=TOOLS, **kw)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None


def hermes_prompt_reference(tools) -> list[dict]:
    """SmolLM2's template does not render tools: the system message must carry them as Hermes text."""
    listing = "\n".join(json.dumps(t) for t in tools)
    system = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n"
              f"<tools>\n{listing}\n</tools>\n\n"
              "For each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    return [{"role": "system", "content": system}, *ASK,
            {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                             '\n</tool_call>'},
            {"role": "user", "content": f"<tool_response>\n{RESULT}\n</tool_response>"}]


def reference_prompt_tokens(tokenizer, messages, tools=None) -> int:
    """Tokens of the prompt transformers' renderer makes of the conversation."""
    (text,), _ = render_jinja_template([messages], tools=tools, chat_template=tokenizer.chat_template,
                                       add_generation_prompt=True, bos_token=tokenizer.spec.bos_token,
                                       eos_token=tokenizer.spec.eos_token)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_follow_up_with_call_and_result_renders_as_hermes_text_and_answers(server):
    from flashserve.tokenizer.tokenizer import Tokenizer

    base, model = server
    r = client(base).chat.completions.create(model=model, messages=FOLLOW_UP, tools=TOOLS, temperature=0,
                                             max_tokens=12)
    tok = Tokenizer.from_model_path(model)
    assert r.usage.prompt_tokens == reference_prompt_tokens(tok, hermes_prompt_reference(TOOLS))
    answer = r.choices[0].message
    assert answer.content or answer.tool_calls


@pytest.mark.parametrize("name, body, problem", [
    ("unknown named tool", dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_tide"}}),
     "'get_tide'"),
    ("invalid parameters schema", dict(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "objekt"}}}}}]),
     "invalid parameters schema"),
    ("parameters not an object", dict(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]), "type 'object'"),
    ("tool_choice without tools", dict(tool_choice="required"), "tool_choice is only allowed when tools"),
    ("response_format with required", dict(tools=TOOLS, tool_choice="required",
                                           response_format={"type": "json_object"}), "response_format"),
    ("response_format with a named tool", dict(tools=TOOLS, tool_choice={"type": "function",
                                                                         "function": {"name": "get_time"}},
                                               response_format={"type": "json_object"}), "response_format"),
    ("two tools of one name", dict(tools=[WEATHER, WEATHER]), "more than once"),
    ("bad function name", dict(tools=[{"type": "function", "function": {"name": "get weather"}}]), "name"),
    ("call arguments that are not JSON", dict(messages=ASK + [
        {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": "{city"}}]}]),
     "not valid JSON"),
])
def test_bad_tool_requests_get_400(server, name, body, problem):
    base, model = server
    c = client(base)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=model, **{"messages": ASK, "max_tokens": 5, **body})
    assert info.value.status_code == 400
    err = info.value.body.get("error", info.value.body)
    assert err["type"] == "invalid_request_error" and problem in err["message"], err["message"]


@pytest.fixture(scope="module")
def qwen_server(qwen05_gguf):
    with serving(qwen05_gguf) as s:
        yield s


SEARCH = {"type": "function", "function": {
    "name": "search_web", "description": "Search the web for a query",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


@pytest.mark.slow
@pytest.mark.parametrize("tools", [TOOLS, [*TOOLS, SEARCH]], ids=["bare-json", "fenced-json"])
def test_auto_qwen_calls_get_weather_for_paris(qwen_server, tools):
    """At temperature 0 Qwen2.5-Coder-0.5B answers this with a get_weather call (measured): a bare
    JSON object with two tools offered, a fenced ```json block with three; the server must hand
    it back as a parsed call, streamed or not."""
    base, model = qwen_server
    c = client(base)
    kw = dict(model=model, messages=ASK, tools=tools, temperature=0, max_tokens=60)
    for choice in (c.chat.completions.create(**kw).choices[0], streamed(c, **kw)):
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        assert_valid_calls(choice.message.tool_calls, ["get_weather"])
        assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] == "Paris"


@pytest.mark.slow
def test_qwen_follow_up_renders_as_transformers_renders_it(qwen_server):
    from flashserve.tokenizer.tokenizer import Tokenizer

    base, model = qwen_server
    r = client(base).chat.completions.create(model=model, messages=FOLLOW_UP, tools=TOOLS, temperature=0,
                                             max_tokens=8)
    # transformers' convention: a call's arguments are an object, not OpenAI's JSON text
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": RESULT}]
    tok = Tokenizer.from_model_path(model)
    assert r.usage.prompt_tokens == reference_prompt_tokens(tok, messages, TOOLS)
    answer = r.choices[0].message
    assert answer.content or answer.tool_calls


# Qwen2.5-Coder-0.5B writes one <tool_call> block per call when the system message shows it how
# (measured at temperature 0: two calls for these questions; without the example it writes one).
EXAMPLE = ("Answer every question only with tool calls, one <tool_call></tool_call> block per call, and no "
           "other text. Example: for 'What is the weather in Berlin and the time in Rome?' answer\n"
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>')
PARIS_TOKYO = [{"role": "system", "content": EXAMPLE},
               {"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]


@pytest.mark.slow
def test_auto_qwen_parallel_calls_stream_and_parallel_false_keeps_one(qwen_server):
    base, model = qwen_server
    c = client(base)
    kw = dict(model=model, messages=PARIS_TOKYO, tools=TOOLS, temperature=0, max_tokens=80)
    whole = c.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and not whole.message.content
    expected = [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert [(n, json.loads(a)) for n, a in expected] == [("get_weather", {"city": "Paris"}),
                                                        ("get_time", {"city": "Tokyo"})]
    calls, finish = stream_calls(c.chat.completions.create(stream=True, **kw))
    assert finish == {0: "tool_calls"}
    assert [(name, "".join(pieces)) for name, pieces in calls[0].values()] == expected
    assert all(len(pieces) >= 2 for _, pieces in calls[0].values()), calls
    for one in (c.chat.completions.create(parallel_tool_calls=False, **kw).choices[0],
                streamed(c, parallel_tool_calls=False, **kw)):
        assert one.finish_reason == "tool_calls" and not one.message.content
        assert [(t.function.name, t.function.arguments) for t in one.message.tool_calls] == expected[:1]
