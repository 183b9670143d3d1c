"""Model output text → (content, tool calls), one small class per format a chat template teaches.

Every reader answers `read(text, final)` for the text generated so far. Before the end
(final=False) it returns only what is settled: content that can no longer turn out to be part
of a call, and the calls whose text is complete. Both only grow as the text grows, so a stream
sends each new piece once; at the end (final=True) the whole text is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it


def _call(obj, args_keys: tuple[str, ...]) -> ToolCall | None:
    """{"name": ..., <args key>: {...}} → ToolCall; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_calls(text: str, args_keys: tuple[str, ...]) -> list[ToolCall] | None:
    """The whole text as calls: one object, a list of them, or objects separated by ';'.
    None unless every part is a call."""
    decoder, pos, objs = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        objs.extend(obj if isinstance(obj, list) else [obj])
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
    calls = [_call(o, args_keys) for o in objs]
    return calls if calls and all(calls) else None


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _content(runs: list[str]) -> str:
    """The content around calls: runs[k] is the text between call k-1 and call k. Without calls
    it is the text as written; with them, each run loses the blank next to a call and the
    non-empty runs are joined by newlines."""
    if len(runs) == 1:
        return runs[0]
    return "\n".join(r for r in [runs[0]] + [r.lstrip() for r in runs[1:]] if r)


class HermesToolParser:
    """Hermes / Qwen2.5: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number,
    with text around them. A block whose JSON is not a call stays content, tags and all; an
    unclosed block at the end is read as if closed (models stop at end-of-turn instead).
    Qwen2.5-Coder-0.5B writes the bare object without the tags (measured at temperature 0), so
    a message that is nothing but such objects is read as calls too."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    ARGS = ("arguments", "parameters")

    def read(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        if self.OPEN not in text:
            stripped = text.lstrip()
            if stripped.startswith(("{", "[")):  # maybe a bare call: settled only at the end
                if not final:
                    return "", []
                calls = _json_calls(stripped, self.ARGS)
                return ("", calls) if calls else (text, [])
        # runs[k]: the content between call k-1 and call k (blocks that are no call included)
        runs, calls, pos = [""], [], 0
        while True:
            start = text.find(self.OPEN, pos)
            if start < 0:
                break
            runs[-1] += text[pos:start]
            end = text.find(self.CLOSE, start)
            if end < 0 and not final:  # an open block: settled when it closes
                runs[-1] = runs[-1].rstrip()
                return _content(runs), calls
            body_end = len(text) if end < 0 else end
            pos = len(text) if end < 0 else end + len(self.CLOSE)
            found = _json_calls(text[start + len(self.OPEN):body_end], self.ARGS)
            if found:
                calls.extend(found)
                runs[-1] = runs[-1].rstrip()
                runs.append("")
            else:
                runs[-1] += text[start:pos]
        runs[-1] += text[pos:]
        if not final:  # hold back what may still become a block, and the blank before it
            runs[-1] = runs[-1][:len(runs[-1]) - _held_prefix(runs[-1], self.OPEN)].rstrip()
        return _content(runs), calls


class Llama3JsonToolParser:
    """Llama 3.x: the whole message is `{"name": ..., "parameters": {...}}` (or several, separated
    by ';'), optionally after `<|python_tag|>`. Anything else is content."""

    TAG = "<|python_tag|>"
    ARGS = ("parameters", "arguments")

    def read(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        stripped = text.lstrip()
        maybe_call = stripped.startswith(("{", "[", self.TAG)) or self.TAG.startswith(stripped)
        if not maybe_call:
            return text, []
        if not final:
            return "", []
        calls = _json_calls(stripped.removeprefix(self.TAG), self.ARGS)
        return ("", calls) if calls else (text, [])


PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def parser_name_for_template(template: str | None) -> str:
    """The format a chat template teaches its model. Templates that do not render tools get
    flashserve's Hermes-style tool prompt (tool_prompt.py), so Hermes is the default."""
    if template and "<tool_call>" not in template and ("<|python_tag|>" in template or
                                                      '"parameters": dictionary' in template):
        return "llama3_json"
    return "hermes"
