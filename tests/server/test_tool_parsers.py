"""Tool-call parsers on literal model outputs: what is a call, what stays content, and a stream
read piece by piece ends where the whole text read at once does."""
from __future__ import annotations

import json

import pytest

from flashserve.entrypoints.openai.tool_choice import NamedCallReader, RequiredCallsReader
from flashserve.entrypoints.openai.tool_parsers import (HermesToolParser, Llama3JsonToolParser, ToolCall,
                                                        parser_name_for_template)


def calls(*pairs) -> list[ToolCall]:
    return [ToolCall(name, json.dumps(args)) for name, args in pairs]


WEATHER_PARIS = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME_TOKYO = ("get_time", {"city": "Tokyo"})

HERMES = [
    # (model output, content, calls)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "", calls(WEATHER_PARIS)),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>',
     "", calls(WEATHER_PARIS, TIME_TOKYO)),
    ('Let me look that up.\n\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>',
     "Let me look that up.", calls(TIME_TOKYO)),
    ('<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>\nDone, one moment.',
     "Done, one moment.", calls(TIME_TOKYO)),
    # stopped at end-of-turn before the closing tag
    ('<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}', "", calls(TIME_TOKYO)),
    # Qwen2.5-Coder-0.5B's own output for "weather in Paris" (no tags)
    ('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}', "", calls(WEATHER_PARIS)),
    ('{"name": "get_time", "parameters": {"city": "Tokyo"}}', "", calls(TIME_TOKYO)),
    # malformed JSON, a JSON object that is no call, and plain text stay content as written
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n', 
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n', []),
    ('{"city": "Paris", "population": 2102650}', '{"city": "Paris", "population": 2102650}', []),
    ("It is sunny in Paris today.\n", "It is sunny in Paris today.\n", []),
    # a broken block keeps its text, the good one after it is a call
    ('<tool_call>\n{"name": 1}\n</tool_call> then <tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}'
     '\n</tool_call>', '<tool_call>\n{"name": 1}\n</tool_call> then', calls(TIME_TOKYO)),
    # arguments written as a JSON string
    ('<tool_call>\n{"name": "get_time", "arguments": "{\\"city\\": \\"Tokyo\\"}"}\n</tool_call>', "", calls(TIME_TOKYO)),
]

LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", calls(WEATHER_PARIS)),
    ('<|python_tag|>{"name": "get_time", "parameters": {"city": "Tokyo"}}', "", calls(TIME_TOKYO)),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"city": "Tokyo"}}', "", calls(WEATHER_PARIS, TIME_TOKYO)),
    ('{"name": "get_weather", "parameters": {"city": "Paris"', '{"name": "get_weather", "parameters": {"city": "Paris"',
     []),
    ('The call would be {"name": "get_time", "parameters": {"city": "Tokyo"}}',
     'The call would be {"name": "get_time", "parameters": {"city": "Tokyo"}}', []),
    ('{"name": "get_time", "parameters": {"city": "Tokyo"}} and more', 
     '{"name": "get_time", "parameters": {"city": "Tokyo"}} and more', []),
]

CASES = [(HermesToolParser, *c) for c in HERMES] + [(Llama3JsonToolParser, *c) for c in LLAMA3]


@pytest.mark.parametrize("parser, text, content, expected", CASES)
def test_whole_output(parser, text, content, expected):
    assert parser().read(text, final=True) == (content, expected)


@pytest.mark.parametrize("parser, text, content, expected", CASES)
def test_streamed_pieces_add_up_to_the_whole(parser, text, content, expected):
    """Read after every character, as a stream sees it: what is settled only ever grows, and
    the pieces a stream sends (content suffixes, new calls) join into the whole reading."""
    p, sent_content, sent_calls = parser(), "", []
    for end in range(len(text) + 1):
        got_content, got_calls = p.read(text[:end], final=end == len(text))
        assert got_content.startswith(sent_content), (text[:end], got_content, sent_content)
        assert got_calls[:len(sent_calls)] == sent_calls
        sent_content, sent_calls = got_content, got_calls
    assert (sent_content, sent_calls) == (content, expected)


def test_partial_call_is_held_back_until_it_closes():
    p = HermesToolParser()
    head = 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Tok'
    assert p.read(head, final=False) == ("Checking.", [])
    assert p.read("Checking.\n<tool_", final=False) == ("Checking.", [])
    assert p.read(head + 'yo"}}\n</tool_call>', final=False) == ("Checking.", calls(TIME_TOKYO))


def test_forced_call_readers():
    required = RequiredCallsReader()
    text = '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, ' \
           '{"name": "get_time", "arguments": {"city": "Tokyo"}}]'
    assert required.read(text, final=True) == ("", calls(WEATHER_PARIS, TIME_TOKYO))
    assert required.read(text[:30], final=False) == ("", [])
    assert required.read(text[:30], final=True) == (text[:30], [])  # cut short by max_tokens
    named = NamedCallReader("get_time")
    assert named.read('{"city": "Tokyo"}', final=True) == ("", calls(TIME_TOKYO))
    assert named.read('{"city": "To', final=True) == ('{"city": "To', [])


def test_parser_follows_the_chat_template():
    qwen = "{%- for tool in tools %}...For each function call, return ... <tool_call></tool_call> XML tags"
    llama31 = '{{- "<|python_tag|>" + tool_call.name }} ... {"name": function name, "parameters": dictionary ...}'
    smollm2 = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}"
    assert parser_name_for_template(qwen) == "hermes"
    assert parser_name_for_template(llama31) == "llama3_json"
    assert parser_name_for_template(smollm2) == "hermes"  # tools reach it as Hermes text (tool_prompt.py)
