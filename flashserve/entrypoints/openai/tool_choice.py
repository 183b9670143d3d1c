"""A chat request's tools and tool_choice → what the template renders, the constraint that
forces a call, and the reader that turns the output text into tool calls.

"none" renders and reads no tools. "auto" renders them and reads the output with the model's
parser: text that is no call stays content. "required" and a named function use structured
output so that the model cannot answer without a valid call: "required" constrains the output
to a JSON array of calls (each a declared name with arguments valid for that tool's schema), a
named function to that function's arguments object. parallel_tool_calls=false allows one call:
"auto" keeps the first the model writes and the request ends as soon as it has ended, "required"
constrains the array to one item (and ends the same way, before the array's closing bracket).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from flashserve.entrypoints.openai.json_scan import BAD, REST, JsonScan
from flashserve.entrypoints.openai.tool_call_events import Event
from flashserve.entrypoints.openai.tool_call_reader import BLANK, ToolCallReader
from flashserve.entrypoints.openai.tool_formats import PARSERS, REQUIRED, parser_name_for_template
from flashserve.entrypoints.openai.tool_prompt import renders_tools
from flashserve.errors import InvalidRequestError
from flashserve.sampling_params import GuidedDecodingParams

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolSupport:
    """How this server's model takes tools, decided once at start-up from its chat template."""

    parser_name: str
    native: bool  # the template renders tools itself (else tool_prompt.py's Hermes text)

    @classmethod
    def for_tokenizer(cls, tokenizer, parser_name: str | None = None) -> "ToolSupport":
        return cls(parser_name or parser_name_for_template(tokenizer.chat_template), renders_tools(tokenizer))


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict] | None  # for the prompt; None: no tools
    guided: GuidedDecodingParams | None  # the forcing constraint of "required" or a named function
    # a reader per output (tool_call_reader.py): .feed(text, final) → events; .complete: it wants no more text
    new_reader: Callable[[], object]


class NamedCallReader:
    """Output under a named function's constraint: its arguments object, a call from the first
    character on. If it breaks off (max_tokens), the arguments end where they had got to."""

    complete = False  # the constraint ends the output after the one object

    def __init__(self, name: str):
        self.name = name
        self.scan: JsonScan | None = None
        self.fed = self.sent = 0
        self.broken = False

    def feed(self, text: str, final: bool) -> list[Event]:
        events = []
        for ch in text[self.fed:]:
            if self.scan is None:
                if ch in BLANK:
                    continue
                self.scan = JsonScan()
                events.append(Event("call", 0, self.name))
            if not self.broken and self.scan.feed(ch) not in (BAD, REST):
                continue
            self.broken = True
        self.fed = len(text)
        if self.scan is not None:
            piece = self.scan.text(self.sent, self.scan.certain)
            self.sent = self.scan.certain
            if piece:
                events.append(Event("args", 0, piece))
        return events


class PlainTextReader:
    """No tools: the output is content as written."""

    complete = False

    def __init__(self):
        self.fed = 0

    def feed(self, text: str, final: bool) -> list[Event]:
        piece, self.fed = text[self.fed:], len(text)
        return [Event("content", 0, piece)] if piece else []


def _checked_parameters(tool) -> dict:
    """A tool's parameters schema, checked: an object schema that structured output can compile."""
    name, schema = tool.function.name, tool.function.parameters
    if schema is None:
        return NO_ARGUMENTS
    if schema.get("type", "object") != "object":
        raise InvalidRequestError(f"tool {name!r}: parameters must be a JSON schema of type 'object', "
                                  f"got type {schema['type']!r}")
    try:
        GuidedDecodingParams(json=schema)
    except ValueError as exc:
        raise InvalidRequestError(f"tool {name!r} has an invalid parameters schema: {exc}") from None
    return schema


def _closed(schema: dict) -> dict:
    """The arguments schema a forced call follows: an object that declares its properties and
    says nothing of others gets no others. Extra keys are valid JSON schema but no function
    takes them, and a small model given the room fills them with prose (SmolLM2 did)."""
    if "properties" in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def plan_tools(req, support: ToolSupport) -> ToolPlan:
    """The request's ToolPlan; InvalidRequestError (HTTP 400) naming what is wrong."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None:
            raise InvalidRequestError("tool_choice is only allowed when tools are given")
        return ToolPlan(None, None, PlainTextReader)
    names = [t.function.name for t in req.tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequestError(f"tools declare the function name {dupes[0]!r} more than once")
    params = {t.function.name: _checked_parameters(t) for t in req.tools}
    if choice == "none":
        return ToolPlan(None, None, PlainTextReader)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    max_calls = 1 if req.parallel_tool_calls is False else None
    if choice is None or choice == "auto":
        return ToolPlan(tools, None, partial(ToolCallReader, PARSERS[support.parser_name], max_calls, names))
    if req.output_constraint() is not None:
        raise InvalidRequestError("tool_choice 'required' or a named function cannot be combined with "
                                  "response_format or guided decoding: both constrain the whole output")
    if choice == "required":
        calls = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]},
                                                              "arguments": _closed(p)},
                            "required": ["name", "arguments"], "additionalProperties": False}
                           for n, p in params.items()]}
        schema = {"type": "array", "items": calls, "minItems": 1}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(tools, GuidedDecodingParams(json=schema), partial(ToolCallReader, REQUIRED, max_calls))
    name = choice.function.name
    if name not in params:
        raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not among the tools "
                                  f"({', '.join(names)})")
    return ToolPlan(tools, GuidedDecodingParams(json=_closed(params[name])), partial(NamedCallReader, name))
