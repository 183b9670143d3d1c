"""Tool calls over real HTTP with the official openai client, on outputs a regex makes SmolLM2
write: n > 1 under parallel_tool_calls=false ends each choice at its own first call, and a bare
call after prose is a call with the prose as its content (JSON that is no call stays content)."""
from __future__ import annotations

import json

from tests.server.test_tool_calling import TOOLS, TWO_CITIES, client, literal_regex, sampled_by

# The first call's city is short or long (sampled: the seeds below give both among 4 choices),
# then a second call and text: what each choice would go on to write without the flag.
SHORT, LONG = "London", "Paris, the capital of France, on the river Seine, under the grey sky of a rainy autumn day"
CALL_START = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
AFTER_CALL = ('\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>\n'
              + "Both calls are on their way, with their answers to follow. " * 3)
SHORT_OR_LONG = (literal_regex(CALL_START) + f"({SHORT}|{literal_regex(LONG)})" + literal_regex('"}}' + AFTER_CALL))


def first_call_text(city: str) -> str:
    return CALL_START + city + '"}}'


def check_frozen_at_its_call(tokens: list[str], city: str) -> None:
    """A choice's tokens run through its call's closing brace and stop at the token that wrote it."""
    text, call = "".join(tokens), first_call_text(city)
    assert text.startswith(call), text
    assert not "".join(tokens[:-1]).startswith(call), text


def test_parallel_tool_calls_false_ends_each_choice_at_its_own_first_call(server):
    """n=4 sampled choices, some with a short first call and some with a long one: each ends at its
    own call (one call, finish_reason "tool_calls", its tokens and logprobs through the call's
    closing brace), so the engine samples about the sum of the calls' tokens, not 4 x the longest
    plus what comes after; the stream gives each choice the same call and nothing after its end."""
    base, model = server
    c = client(base)
    kw = dict(model=model, messages=TWO_CITIES, tools=TOOLS, temperature=2.0, seed=1, n=4, max_tokens=200,
              parallel_tool_calls=False, extra_body={"guided_regex": SHORT_OR_LONG})
    r, sampled = sampled_by(base, lambda: c.chat.completions.create(logprobs=True, **kw))
    cities = []
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        cities.append(json.loads(call.function.arguments)["city"])
        check_frozen_at_its_call([t.token for t in choice.logprobs.content], cities[-1])
    assert set(cities) == {SHORT, LONG}, "the seed no longer gives both kinds of choice"
    own = [len(choice.logprobs.content) for choice in r.choices]
    assert r.usage.completion_tokens == sum(own)
    slack = 4  # per choice: steps that ran between its call's last token and its end
    assert sum(own) <= sampled <= sum(own) + 4 * slack, (sampled, own)
    assert sampled < 4 * max(own)  # the short choices did not run on with the long ones

    def stream():
        calls, finish, after_end = {}, {}, []
        for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            for ch in chunk.choices:
                if ch.index in finish:
                    after_end.append(ch)
                assert not ch.delta.content
                for d in ch.delta.tool_calls or ():
                    calls.setdefault(ch.index, []).append(d)
                if ch.finish_reason:
                    finish[ch.index] = ch.finish_reason
            usage = chunk.usage or None
        return calls, finish, after_end, usage

    (calls, finish, after_end, usage), streamed_sampled = sampled_by(base, stream)
    assert finish == {i: "tool_calls" for i in range(4)} and not after_end
    for choice in r.choices:
        deltas = calls[choice.index]
        assert {d.index for d in deltas} == {0} and deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments for d in deltas) == choice.message.tool_calls[0].function.arguments
    assert usage.completion_tokens == r.usage.completion_tokens
    assert streamed_sampled <= sum(own) + 4 * slack


PROSE_THEN_CALL = 'Let me check that for you. {"name": "get_weather", "arguments": {"city": "Paris"}}'
PROSE_THEN_JSON = 'Here is the record: {"name": "John", "age": 30}'


def test_bare_call_after_prose_is_a_call_and_the_prose_its_content(server):
    """A bare call (no tags) after a sentence, naming an offered tool, is a call with the sentence as
    content, streamed or not; a JSON object after prose that names no offered tool stays content."""
    base, model = server
    c = client(base)
    kw = dict(model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS,
              temperature=0, max_tokens=60)
    forced = dict(extra_body={"guided_regex": literal_regex(PROSE_THEN_CALL)}, **kw)
    whole = c.chat.completions.create(**forced).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "Let me check that for you."
    (call,) = whole.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    content, pieces, finish = "", [], None
    for chunk in c.chat.completions.create(stream=True, **forced):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            pieces += [d.function.arguments for d in ch.delta.tool_calls or ()]
            finish = ch.finish_reason or finish
    assert (content, "".join(pieces), finish) == (whole.message.content, call.function.arguments, "tool_calls")
    plain = c.chat.completions.create(extra_body={"guided_regex": literal_regex(PROSE_THEN_JSON)}, **kw).choices[0]
    assert plain.finish_reason == "stop" and plain.message.tool_calls is None
    assert plain.message.content == PROSE_THEN_JSON


def test_required_with_parallel_tool_calls_false_gives_each_choice_one_call(server):
    """tool_choice "required" under parallel_tool_calls=false (a one-item array grammar): n=3 sampled
    choices each end with exactly one valid call, streamed with the same calls per choice."""
    from tests.server.test_tool_calling import assert_valid_calls

    base, model = server
    c = client(base)
    kw = dict(model=model, messages=TWO_CITIES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              temperature=1.0, seed=3, n=3, max_tokens=60)
    r = c.chat.completions.create(**kw)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message.tool_calls, ["get_weather", "get_time"])
    got: dict[int, list] = {}
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or ():
                got.setdefault(ch.index, []).append(d)
    for choice in r.choices:
        (call,) = choice.message.tool_calls
        deltas = got[choice.index]
        assert {d.index for d in deltas} == {0}
        assert (deltas[0].function.name, "".join(d.function.arguments for d in deltas)) == \
            (call.function.name, call.function.arguments)
