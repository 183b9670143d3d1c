"""Tool-call readers on literal model outputs: what is a call, what stays content, and that a
stream read in any chunking gives out pieces that join into what the whole text reads as."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashserve.entrypoints.openai.json_scan import BAD, END, REST, JsonScan
from flashserve.entrypoints.openai.tool_choice import NamedCallReader
from flashserve.entrypoints.openai.tool_call_events import Event, ToolCall, joined, merged, read_whole
from flashserve.entrypoints.openai.tool_call_reader import ToolCallReader
from flashserve.entrypoints.openai.tool_formats import HERMES, LLAMA3_JSON, REQUIRED, parser_name_for_template


def calls(*pairs) -> list[ToolCall]:
    return [ToolCall(name, json.dumps(args)) for name, args in pairs]


WEATHER_PARIS = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME_TOKYO = ("get_time", {"city": "Tokyo"})
PARIS_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TOKYO_CALL = '{"name": "get_time", "arguments": {"city": "Tokyo"}}'

HERMES_CASES = [
    # (model output, content, calls)
    (f"<tool_call>\n{PARIS_CALL}\n</tool_call>", "", calls(WEATHER_PARIS)),
    (f"<tool_call>\n{PARIS_CALL}\n</tool_call>\n<tool_call>\n{TOKYO_CALL}\n</tool_call>",
     "", calls(WEATHER_PARIS, TIME_TOKYO)),
    (f"Let me look that up.\n\n<tool_call>\n{TOKYO_CALL}\n</tool_call>", "Let me look that up.", calls(TIME_TOKYO)),
    (f"<tool_call>\n{TOKYO_CALL}\n</tool_call>\nDone, one moment.", "Done, one moment.", calls(TIME_TOKYO)),
    (f"One.\n<tool_call>{TOKYO_CALL}</tool_call>  Two. <tool_call>{PARIS_CALL}</tool_call>\n",
     "One.\nTwo.", calls(TIME_TOKYO, WEATHER_PARIS)),
    # stopped at end-of-turn before the closing tag
    (f"<tool_call>\n{TOKYO_CALL}", "", calls(TIME_TOKYO)),
    # Qwen2.5-Coder-0.5B's own output for "weather in Paris" (no tags)
    (PARIS_CALL, "", calls(WEATHER_PARIS)),
    ('{"name": "get_time", "parameters": {"city": "Tokyo"}}', "", calls(TIME_TOKYO)),
    (f"[{PARIS_CALL}, {TOKYO_CALL}]", "", calls(WEATHER_PARIS, TIME_TOKYO)),
    # keys in another order, and the arguments as the model wrote them (blanks and all)
    ('<tool_call>{"arguments": {"city":"Tokyo"}, "name": "get_time"}</tool_call>', "",
     [ToolCall("get_time", '{"city":"Tokyo"}')]),
    ('{"name": "get_time", "arguments": {\n  "city": "Tokyo"\n}}', "",
     [ToolCall("get_time", '{\n  "city": "Tokyo"\n}')]),
    ('<tool_call>{"name": "now"}</tool_call>', "", [ToolCall("now", "{}")]),
    # arguments written as a JSON string
    ('<tool_call>\n{"name": "get_time", "arguments": "{\\"city\\": \\"Tokyo\\"}"}\n</tool_call>', "", calls(TIME_TOKYO)),
    # JSON that is no call, and plain text, stay content as written
    ('<tool_call>\n{"name": 1}\n</tool_call>', '<tool_call>\n{"name": 1}\n</tool_call>', []),
    ('<tool_call>\n{"city": "Paris"}\n</tool_call>', '<tool_call>\n{"city": "Paris"}\n</tool_call>', []),
    ('<tool_call>\n{"name": "f", "arguments": [1]}', '<tool_call>\n{"name": "f", "arguments": [1]}', []),
    ('<tool_call>\n{"name": "get_wea', '<tool_call>\n{"name": "get_wea', []),
    ('{"city": "Paris", "population": 2102650}', '{"city": "Paris", "population": 2102650}', []),
    # a bare object naming no offered tool is an answer, not a call (tagged, any name is a call)
    ('{"name": "John", "age": 30}', '{"name": "John", "age": 30}', []),
    ('{"name": "add_numbers", "arguments": {"a": 5}}', '{"name": "add_numbers", "arguments": {"a": 5}}', []),
    ("It is sunny in Paris today.\n", "It is sunny in Paris today.\n", []),
    ("a < b and <tool_ or </tool_call> <tool_call", "a < b and <tool_ or </tool_call> <tool_call", []),
    ("The call is {\"name\": \"f\"}", "The call is {\"name\": \"f\"}", []),
    # a bare call after prose, when it names an offered tool and begins with its name
    (f"Let me check. {PARIS_CALL}", "Let me check.", calls(WEATHER_PARIS)),
    (f"Sure!\n\n{TOKYO_CALL}\nOne moment.", "Sure!\nOne moment.", calls(TIME_TOKYO)),
    (f"First {PARIS_CALL} then {TOKYO_CALL}", "First\nthen", calls(WEATHER_PARIS, TIME_TOKYO)),
    ('Done: {"name": "get_time"}', "Done:", [ToolCall("get_time", "{}")]),
    # after prose, JSON that is no call of an offered tool stays content as written
    ('John is here: {"name": "John", "age": 30}', 'John is here: {"name": "John", "age": 30}', []),
    ('Like this: {"arguments": {"city": "Tokyo"}, "name": "get_time"}',
     'Like this: {"arguments": {"city": "Tokyo"}, "name": "get_time"}', []),
    ('It is {"city": "Paris", "name": "get_weather"}', 'It is {"city": "Paris", "name": "get_weather"}', []),
    ('Nested {"a": {"name": "get_time", "arguments": {}}}', 'Nested {"a": {"name": "get_time", "arguments": {}}}', []),
    ('Write {"name": "get_weather", "arguments": [1]} or {"name": "get_time", "arguments": "x"}',
     'Write {"name": "get_weather", "arguments": [1]} or {"name": "get_time", "arguments": "x"}', []),
    ("Code: function f() { return {a: 1}; }", "Code: function f() { return {a: 1}; }", []),
    ('Cut short {"name": "get_wea', 'Cut short {"name": "get_wea', []),
    ('A set {1, 2} and [{"name": "get_time", "arguments": {}}]', "A set {1, 2} and", [ToolCall("get_time", "{}")]),
    ('A list [{"a": 1}, {"name": "get_time", "arguments": {}}] [x](y)',
     'A list [{"a": 1}, {"name": "get_time", "arguments": {}}] [x](y)', []),
    ('<tool_call>{"a": {"name": "get_time", "arguments": {}}}</tool_call>',
     '<tool_call>{"a": {"name": "get_time", "arguments": {}}}</tool_call>', []),
    # a broken block keeps its text, the good one after it is a call
    (f'<tool_call>\n{{"name": 1}}\n</tool_call> then <tool_call>\n{TOKYO_CALL}\n</tool_call>',
     '<tool_call>\n{"name": 1}\n</tool_call> then', calls(TIME_TOKYO)),
    # a call that breaks after its name was given out ends where it had got to; the rest of its block is dropped
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call> ok', "ok",
     [ToolCall("get_weather", '{"city":')]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>', "",
     [ToolCall("get_weather", '{"city": "Paris"}')]),
    # cut short by max_tokens in the middle of a number: only its settled part
    ('<tool_call>\n{"name": "f", "arguments": {"n": 12', "", [ToolCall("f", '{"n": ')]),
]

LLAMA3_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", calls(WEATHER_PARIS)),
    ('<|python_tag|>{"name": "get_time", "parameters": {"city": "Tokyo"}}', "", calls(TIME_TOKYO)),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"city": "Tokyo"}}', "", calls(WEATHER_PARIS, TIME_TOKYO)),
    ('{"name": "get_weather", "parameters": {"city": "Paris"', "", [ToolCall("get_weather", '{"city": "Paris"')]),
    ('The call would be {"name": "get_time", "parameters": {"city": "Tokyo"}}',
     'The call would be {"name": "get_time", "parameters": {"city": "Tokyo"}}', []),
    ('{"name": "get_time", "parameters": {"city": "Tokyo"}} and more', "and more", calls(TIME_TOKYO)),
    ("<|python_tag|> hello", "<|python_tag|> hello", []),
]

REQUIRED_CASES = [
    (f"[{PARIS_CALL}, {TOKYO_CALL}]", "", calls(WEATHER_PARIS, TIME_TOKYO)),
    ('[{"name": "get_weather", "arguments": {"city": "Par', "", [ToolCall("get_weather", '{"city": "Par')]),
]

# Qwen2.5-Coder-0.5B (Q4_K_M) at temperature 0 with the tools get_weather, get_time and search_web
# offered through its own chat template: its literal outputs, fenced ```json blocks instead of tags.
OFFERED = ("get_weather", "get_time", "search_web")
QWEN_PARIS = ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris",\n    "unit": "celsius"\n'
              '  }\n}\n```')  # "What is the weather like in Paris today?"
QWEN_SEARCH = ('```json\n{\n  "name": "search_web",\n  "arguments": {\n    "query": "latest python release"\n  }\n}'
               '\n```')  # "Search the web for the latest Python release."
QWEN_CITIES = ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": ["Paris", "London", "Rome"]\n'
               '  }\n}\n```')  # "Get the weather for each of these cities: Paris, London, Rome."
# tools it was not offered (only get_weather and get_time were): content, as written
QWEN_ADD = ('```json\n{\n  "name": "add_numbers",\n  "arguments": {\n    "a": 5,\n    "b": 3\n  }\n}\n```')
QWEN_FLIGHTS = ('```json\n{\n  "name": "get_flights",\n  "arguments": {\n    "city": "Paris",\n    "unit": "celsius"\n'
                '  }\n}\n```')
PARIS_ARGS = '{\n    "city": "Paris",\n    "unit": "celsius"\n  }'

FENCED_CASES = [
    (QWEN_PARIS, "", [ToolCall("get_weather", PARIS_ARGS)]),
    (QWEN_SEARCH, "", [ToolCall("search_web", '{\n    "query": "latest python release"\n  }')]),
    (QWEN_CITIES, "", [ToolCall("get_weather", '{\n    "city": ["Paris", "London", "Rome"]\n  }')]),
    (QWEN_ADD, QWEN_ADD, []),
    (QWEN_FLIGHTS, QWEN_FLIGHTS, []),
    # several blocks, text around them, an array in one block
    (f"{QWEN_PARIS}\n{QWEN_SEARCH}", "", [ToolCall("get_weather", PARIS_ARGS),
                                          ToolCall("search_web", '{\n    "query": "latest python release"\n  }')]),
    (f"Sure, let me check.\n\n{QWEN_PARIS}\n\nOne moment.", "Sure, let me check.\nOne moment.",
     [ToolCall("get_weather", PARIS_ARGS)]),
    (f"```json\n[{PARIS_CALL}, {TOKYO_CALL}]\n```", "", calls(WEATHER_PARIS, TIME_TOKYO)),
    # one offered name does not make a block of others a call; JSON that is no call, code, inline code
    (f"{QWEN_ADD}\n{QWEN_PARIS}", QWEN_ADD, [ToolCall("get_weather", PARIS_ARGS)]),
    ('```json\n{"city": "Paris", "population": 2102650}\n```', '```json\n{"city": "Paris", "population": 2102650}\n```',
     []),
    ("```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
    ("Call `get_weather` with ``city``.", "Call `get_weather` with ``city``.", []),
    ("```json\nnot json\n```", "```json\nnot json\n```", []),
    # cut short inside the block (max_tokens): the arguments as far as they are settled
    ('```json\n{"name": "get_time", "arguments": {"city": "Tok', "", [ToolCall("get_time", '{"city": "Tok')]),
]

CASES = ([(HERMES, OFFERED, *c) for c in HERMES_CASES] + [(LLAMA3_JSON, (), *c) for c in LLAMA3_CASES] +
         [(REQUIRED, (), *c) for c in REQUIRED_CASES] + [(HERMES, OFFERED, *c) for c in FENCED_CASES])
IDS = [f"{'llama3' if f is LLAMA3_JSON else 'required' if f is REQUIRED else 'hermes'}-{i}"
       for i, (f, names, *_) in enumerate(CASES)]


def streamed(reader, text: str, cuts) -> list[Event]:
    """The events of a stream that sees the text grow to each cut, then whole, joined."""
    events = []
    for end in cuts:
        events += reader.feed(text[:end], final=False)
    return merged(events + reader.feed(text, final=True))


def chunkings(text: str, rng: random.Random):
    """One character at a time, every split into two, and random splits."""
    n = len(text)
    yield range(1, n)
    for cut in range(n + 1):
        yield [cut]
    for _ in range(60):
        yield sorted(rng.sample(range(n + 1), rng.randint(1, min(n + 1, 12))))


@pytest.mark.parametrize("fmt, names, text, content, expected", CASES, ids=IDS)
def test_whole_output(fmt, names, text, content, expected):
    assert read_whole(ToolCallReader(fmt, tool_names=names), text) == (content, expected)


@pytest.mark.parametrize("fmt, names, text, content, expected", CASES, ids=IDS)
def test_every_chunking_gives_the_pieces_of_the_whole(fmt, names, text, content, expected):
    whole = ToolCallReader(fmt, tool_names=names).feed(text, final=True)
    rng = random.Random(text)
    for cuts in chunkings(text, rng):
        assert streamed(ToolCallReader(fmt, tool_names=names), text, cuts) == whole, list(cuts)


def test_unmarked_calls_need_offered_tools():
    """Without the offered names a fenced block or a bare object is content, a tagged call is not;
    with max_calls=1 the reading ends at the block's first call."""
    assert read_whole(ToolCallReader(HERMES), QWEN_PARIS) == (QWEN_PARIS, [])
    assert read_whole(ToolCallReader(HERMES), PARIS_CALL) == (PARIS_CALL, [])
    assert read_whole(ToolCallReader(HERMES), f"<tool_call>{PARIS_CALL}</tool_call>") == ("", calls(WEATHER_PARIS))
    r = ToolCallReader(HERMES, max_calls=1, tool_names=OFFERED)
    assert joined(r.feed(f"{QWEN_PARIS}\n{QWEN_SEARCH}", final=False)) == ("", [ToolCall("get_weather", PARIS_ARGS)])
    assert r.complete


def test_prose_before_a_bare_object_is_given_out_at_once_and_a_non_call_released_at_its_first_key():
    r = ToolCallReader(HERMES, tool_names=OFFERED)
    assert r.feed("Let me check. {", final=False) == [Event("content", 0, "Let me check.")]
    assert r.feed('Let me check. {"name": "get_time", "arguments": {', final=False) == \
        [Event("call", 0, "get_time"), Event("args", 0, "{")]
    r = ToolCallReader(HERMES, tool_names=OFFERED)
    assert r.feed('It is {"city"', final=False) == [Event("content", 0, 'It is {"city"')]


def test_pieces_are_given_out_as_they_settle():
    r = ToolCallReader(HERMES)
    assert r.feed("Checking.\n<tool_", final=False) == [Event("content", 0, "Checking.")]
    text = 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Tok'
    assert r.feed(text, final=False) == [Event("call", 0, "get_time"), Event("args", 0, '{"city": "Tok')]
    text += 'yo", "days": 12'
    assert r.feed(text, final=False) == [Event("args", 0, 'yo", "days": ')]  # 12 may become 123
    text += ', "tz": tr'
    assert r.feed(text, final=False) == [Event("args", 0, '12, "tz": ')]  # tr may not become true
    text += 'ue, "s": "a\\u00'
    assert r.feed(text, final=False) == [Event("args", 0, 'true, "s": "a')]  # a half escape is held
    text += 'e9"}}  \n</tool_call>'
    assert r.feed(text, final=False) == [Event("args", 0, '\\u00e9"}')]
    assert r.feed(text + "\nThanks", final=True) == [Event("content", 0, "\nThanks")]


def test_no_call_is_given_out_before_its_name_and_arguments_begin():
    r = ToolCallReader(HERMES)
    assert r.feed('<tool_call>{"name": "get_time", "arguments": ', final=False) == []
    assert r.feed('<tool_call>{"name": "get_time", "arguments": {', final=False) == \
        [Event("call", 0, "get_time"), Event("args", 0, "{")]


def test_parallel_tool_calls_false_reads_up_to_the_end_of_the_first_call():
    """With max_calls=1 a reader is complete once its call has ended, and reads nothing after it
    (the server ends the request there); before that it is not."""
    text = f"Both:\n<tool_call>\n{PARIS_CALL}\n</tool_call>\n<tool_call>\n{TOKYO_CALL}\n</tool_call>\nDone."
    assert read_whole(ToolCallReader(HERMES, max_calls=1), text) == ("Both:", calls(WEATHER_PARIS))
    assert read_whole(ToolCallReader(REQUIRED, max_calls=1), f"[{PARIS_CALL}, {TOKYO_CALL}]") == \
        ("", calls(WEATHER_PARIS))
    end = text.index(PARIS_CALL) + len(PARIS_CALL)  # where the first call's JSON closes
    for cut in range(len(text) + 1):
        r = ToolCallReader(HERMES, max_calls=1)
        r.feed(text[:cut], final=False)
        assert r.complete == (cut >= end), cut
    unbounded = ToolCallReader(HERMES)
    unbounded.feed(text, final=False)
    assert not unbounded.complete
    whole = ToolCallReader(HERMES, max_calls=1).feed(text, final=True)
    assert streamed(ToolCallReader(HERMES, max_calls=1), text, range(1, len(text))) == whole
    # a call that breaks after its name ends the reading too: its arguments end where they got to
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call> ok'
    r = ToolCallReader(HERMES, max_calls=1)
    assert joined(r.feed(broken, final=False)) == ("", [ToolCall("get_weather", '{"city":')]) and r.complete


def test_named_call_reader():
    text = '{"city": "Tokyo", "days": 3}'
    whole = NamedCallReader("get_time").feed(text, final=True)
    assert whole == [Event("call", 0, "get_time"), Event("args", 0, text)]
    assert streamed(NamedCallReader("get_time"), text, range(1, len(text))) == whole
    assert read_whole(NamedCallReader("get_time"), '{"city": "To') == ("", [ToolCall("get_time", '{"city": "To')])


def test_parser_follows_the_chat_template():
    qwen = "{%- for tool in tools %}...For each function call, return ... <tool_call></tool_call> XML tags"
    llama31 = '{{- "<|python_tag|>" + tool_call.name }} ... {"name": function name, "parameters": dictionary ...}'
    smollm2 = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}"
    assert parser_name_for_template(qwen) == "hermes"
    assert parser_name_for_template(llama31) == "llama3_json"
    assert parser_name_for_template(smollm2) == "hermes"  # tools reach it as Hermes text (tool_prompt.py)


# ---- generated outputs: calls with any JSON arguments, written any way, between any content --------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
ARGS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4)
STYLES = st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}])
# content that is no call but looks like the start of markup now and then
CONTENT = st.lists(st.sampled_from(["Sure", " ", "\n", "a < b", "<tool_", "</tool_call", "x.", "é", "`", "```json"]),
                   max_size=5).map("".join)


def expected_content(runs: list[str]) -> str:
    """The content around calls: runs[k] is the text before call k (and runs[-1] after the last);
    blanks next to a call are dropped and the non-empty runs joined by newlines."""
    if len(runs) == 1:
        return runs[0]
    parts = [runs[0].rstrip()] + [r.strip() for r in runs[1:-1]] + [runs[-1].lstrip()]
    return "\n".join(p for p in parts if p)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["get_weather", "get_time"]), ARGS, STYLES), min_size=1, max_size=3),
       st.lists(CONTENT, min_size=4, max_size=4), st.booleans(), st.randoms(use_true_random=False))
def test_generated_hermes_outputs(call_list, runs, bare_first, rng):
    """Calls as a Hermes model writes them (the first one bare or tagged), content around them:
    read whole, the calls come back with their arguments as written and the content by the rule;
    read in random chunks, the same pieces."""
    written = [(name, json.dumps(args, **style)) for name, args, style in call_list]
    blocks = [f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>' for n, a in written]
    runs = runs[:len(blocks) + 1]
    if bare_first:  # a bare call stands at the start of the message
        blocks[0] = blocks[0].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
        runs[0] = ""
    text = runs[0] + "".join(b + r for b, r in zip(blocks, runs[1:]))
    content, got = read_whole(ToolCallReader(HERMES, tool_names=OFFERED), text)
    assert got == [ToolCall(n, a) for n, a in written]
    assert [json.loads(c.arguments) for c in got] == [args for _, args, _ in call_list]
    assert content == expected_content(runs)
    whole = ToolCallReader(HERMES, tool_names=OFFERED).feed(text, final=True)
    for _ in range(5):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(1, min(len(text) + 1, 20))))
        assert streamed(ToolCallReader(HERMES, tool_names=OFFERED), text, cuts) == whole
    assert streamed(ToolCallReader(HERMES, tool_names=OFFERED), text, range(1, len(text))) == whole


# ---- the JSON scanner against json.loads ---------------------------------------------------------

def scan_accepts(text: str) -> bool:
    """The scanner reads text as one complete JSON value with only blanks after it."""
    s = JsonScan()
    for i, ch in enumerate(text):
        status = s.feed(ch)
        if status == BAD:
            return False
        if status in (END, REST):
            rest = text[i + 1:] if status == END else text[i:]
            return not rest.strip(" \t\n\r")
    return False


def loads_accepts(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


JSON_TEXTS = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps([v])),
    st.text(alphabet='{}[]",:0123456789.-+eEtrufalsn \\u\n', max_size=20).map(lambda t: "[" + t),
    st.tuples(ARGS.map(json.dumps), st.integers(0, 60), st.sampled_from(['', '"', ",", "}", "]", "\\", "1", " ", "\x01"]))
    .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),
)


@settings(max_examples=400, deadline=None)
@given(JSON_TEXTS)
def test_scanner_accepts_what_json_loads_accepts(text):
    assert scan_accepts(text) == loads_accepts(text), text


@settings(max_examples=100, deadline=None)
@given(ARGS, STYLES)
def test_scanner_members(args, style):
    text = json.dumps({"name": "f", "arguments": args, "n": 1}, **style)
    s, certain = JsonScan(), 0
    for ch in text:
        s.feed(ch)
        assert s.certain >= certain
        certain = s.certain
    assert s.done and s.certain == len(text)
    spans = {key: text[start:end] for key, start, end in s.members}
    assert {k: json.loads(v) for k, v in spans.items()} == {"name": "f", "arguments": args, "n": 1}
