"""Structured output over real HTTP with the official openai client: response_format (json_object,
json_schema) and vLLM's guided_* fields on chat and completions, streamed and not; bad constraints
get an OpenAI-style 400 and the server keeps serving."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema_rs
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

# Bounded (as the random schemas below), so that a greedy answer always closes within max_tokens: with
# an unbounded integer SmolLM2 wrote "300000..." on to the end of 80 tokens once a kernel's float
# order changed.
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "population": {"type": "integer", "minimum": 0, "maximum": 10**10},
                   "capital": {"type": "boolean"}},
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Give me a city as JSON."}]


def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def json_schema_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}


def test_chat_json_schema_greedy_and_sampled_n2(server):
    base, model = server
    c = client(base)
    r = c.chat.completions.create(model=model, messages=ASK, max_tokens=80, temperature=0,
                                  response_format=json_schema_format())
    outs = [r.choices[0]]
    r = c.chat.completions.create(model=model, messages=ASK, max_tokens=80, temperature=1.0, seed=4, n=2,
                                  response_format=json_schema_format())
    outs += r.choices
    assert len(outs) == 3
    for choice in outs:
        assert choice.finish_reason == "stop"
        jsonschema_rs.validate(SCHEMA, json.loads(choice.message.content))


def test_chat_json_object_streamed(server):
    base, model = server
    stream = client(base).chat.completions.create(model=model, messages=ASK, max_tokens=80, temperature=0.7,
                                                  seed=1, stream=True, response_format={"type": "json_object"})
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    assert isinstance(json.loads(text), dict)


def test_chat_guided_choice(server):
    base, model = server
    choices = ["positive", "negative", "neutral"]
    r = client(base).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Sentiment of 'what a lovely day'?"}],
        max_tokens=10, temperature=1.0, seed=2, n=2, extra_body={"guided_choice": choices})
    assert [ch.message.content in choices for ch in r.choices] == [True, True]


def test_completions_guided_regex_json_and_grammar(server):
    base, model = server
    c = client(base)
    pattern = r"\d{4}-\d{2}-\d{2}"
    r = c.completions.create(model=model, prompt="The date today is ", max_tokens=20, temperature=1.0, seed=3, n=2,
                             extra_body={"guided_regex": pattern})
    assert all(re.fullmatch(pattern, ch.text) for ch in r.choices), [ch.text for ch in r.choices]
    r = c.completions.create(model=model, prompt="A city as JSON: ", max_tokens=80, temperature=0,
                             extra_body={"guided_json": SCHEMA})
    jsonschema_rs.validate(SCHEMA, json.loads(r.choices[0].text))
    r = c.completions.create(model=model, prompt="A city as JSON: ", max_tokens=80, temperature=0,
                             extra_body={"response_format": json_schema_format()})
    jsonschema_rs.validate(SCHEMA, json.loads(r.choices[0].text))
    r = c.completions.create(model=model, prompt="Is the sky blue? ", max_tokens=10, temperature=0,
                             extra_body={"guided_grammar": 'root ::= ("Yes" | "No") "."'})
    assert r.choices[0].text in ("Yes.", "No.")


# Random JSON schemas of the kinds a caller writes: objects of named members, nested objects and
# arrays, bounded strings and integers, enums, booleans, nulls. Bounded, so that every answer
# fits in max_tokens and a cut-short text is a failure of the test, not of the grammar.
KEYS = st.from_regex(r"[a-z]{1,8}", fullmatch=True)
LEAVES = st.one_of(
    st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=1, max_size=4, unique=True).map(
        lambda v: {"enum": v}),
)


def objects(members):
    return st.dictionaries(KEYS, members, min_size=1, max_size=4).map(
        lambda p: {"type": "object", "properties": p, "required": sorted(p), "additionalProperties": False})


MEMBERS = st.recursive(LEAVES, lambda inner: objects(inner) | st.tuples(inner, st.integers(0, 3)).map(
    lambda t: {"type": "array", "items": t[0], "maxItems": t[1]}), max_leaves=6)


@settings(max_examples=1, derandomize=True, deadline=None, database=None)
@given(st.lists(objects(MEMBERS), min_size=20, max_size=20, unique_by=json.dumps))
def test_20_random_schemas_get_valid_json(server, schemas):
    """20 hypothesis-made schemas sent at once as response_format json_schema (strict) through the
    openai client, sampled at temperature 0.8: every answer ends by itself and validates."""
    base, model = server

    async def ask(c, i, schema):
        r = await c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Answer as JSON for this schema: {json.dumps(schema)}"}],
            max_tokens=300, temperature=0.8, seed=i, response_format=json_schema_format(schema))
        return r.choices[0]

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(ask(c, i, s) for i, s in enumerate(schemas)))

    for schema, choice in zip(schemas, asyncio.run(ask_all())):
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema_rs.validate(schema, json.loads(choice.message.content))


@pytest.mark.parametrize("name, extra, problem", [
    ("malformed schema", {"response_format": json_schema_format({"type": "objekt"})}, "objekt"),
    ("schema with a dangling $ref", {"guided_json": {"$ref": "#/defs/nowhere"}}, "nowhere"),
    ("schema text that is not JSON", {"guided_json": "{not json"}, "not valid JSON"),
    ("bad regex", {"guided_regex": "(unclosed"}, "unclosed"),
    ("bad grammar", {"guided_grammar": 'root ::= "a'}, "grammar"),
    ("empty choice", {"guided_choice": []}, "choice"),
    ("two constraints", {"guided_regex": "a+", "guided_choice": ["a"]}, "exactly one"),
    ("unknown response_format type", {"response_format": {"type": "xml"}}, "response_format"),
    ("json_schema without its object", {"response_format": {"type": "json_schema"}}, "json_schema"),
])
def test_bad_constraints_get_400_and_the_server_keeps_serving(server, name, extra, problem):
    base, model = server
    c = client(base)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=model, messages=ASK, max_tokens=10, extra_body=extra)
    assert info.value.status_code == 400
    err = info.value.body.get("error", info.value.body)
    assert err["type"] == "invalid_request_error" and problem in err["message"], err
    r = c.chat.completions.create(model=model, messages=ASK, max_tokens=20, temperature=0,
                                  response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
