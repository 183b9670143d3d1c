"""GuidedDecodingParams → the grammar text llguidance runs, checked without a tokenizer.

The one place that knows how each kind of constraint is spelled for the library; both the
validation of SamplingParams and the runner's matchers (sample/guided.py) read it from here.
No torch: SamplingParams imports this when a request carries a constraint.
"""
from __future__ import annotations

import functools
import json

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

KINDS = ("json", "regex", "choice", "grammar", "json_object")

# json.dumps' own separators and no free whitespace between tokens: the text reads the way
# models write JSON, and a small model cannot wander into an endless run of spaces.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(gd) -> str:
    """The llguidance grammar of a GuidedDecodingParams; ValueError naming the problem.
    Cached per constraint, so a schema sent again is not rebuilt or checked again."""
    return _build(*_key(gd))


def _key(gd) -> tuple[str, str]:
    """(kind, canonical text) of the one constraint set: the cache key."""
    given = [k for k in KINDS[:-1] if getattr(gd, k) is not None] + (["json_object"] if gd.json_object else [])
    if len(given) != 1:
        raise ValueError(f"guided decoding takes exactly one of {', '.join(KINDS)}; got "
                         f"{', '.join(given) if given else 'none'}")
    kind = given[0]
    value = getattr(gd, kind)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"the JSON schema must be a JSON object, got {type(value).__name__}")
        return kind, json.dumps(value)  # key order kept: properties are generated in the schema's order
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("guided choice must be a non-empty list of non-empty strings")
        return kind, json.dumps(list(value))
    if kind == "json_object":
        return kind, ""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"guided {kind} must be a non-empty string")
    return kind, value


@functools.lru_cache(maxsize=256)
def _build(kind: str, value: str) -> str:
    M = llguidance.LLMatcher
    if kind == "json":
        text = M.grammar_from_json_schema(value, defaults=_JSON_OPTIONS)
    elif kind == "json_object":
        text = M.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    elif kind == "regex":
        text = M.grammar_from_regex(value)
    elif kind == "choice":
        # Each choice a Lark string literal; JSON's string escapes are Lark's.
        text = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(value)))
    else:  # Lark as llguidance takes it, or GBNF as llama.cpp users write it (root ::= ...)
        try:
            text = M.grammar_from_lark(any_to_lark(value))
        except Exception as exc:  # the converter is plain Python over user text: any failure is the text's
            raise ValueError(f"invalid guided grammar: {exc}") from None
    is_error, messages = M.validate_grammar_with_warnings(text, None)
    if is_error:
        what = "JSON schema" if kind.startswith("json") else kind
        raise ValueError(f"invalid guided {what}: {messages[0].strip()}")
    return text
