"""What a tool-call reader gives out (tool_call_reader.py), and how its events join into a reply.

An Event is a piece of content, the start of a call, or a piece of a call's arguments; a stream sends
them as they come, and a reply that does not stream joins them into its content and ToolCalls
(joined). Made by the readers (tool_call_reader.py, tool_choice.py); read by the chat endpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it


class Event(NamedTuple):
    kind: str  # "content" | "call" (text: the function's name) | "args" (text: a piece of its arguments)
    index: int  # the call's index; 0 for content
    text: str


def merged(events: list[Event]) -> list[Event]:
    """Neighbouring pieces of one kind and call joined."""
    out: list[Event] = []
    for e in events:
        if out and e.kind != "call" and out[-1].kind == e.kind and out[-1].index == e.index:
            out[-1] = Event(e.kind, e.index, out[-1].text + e.text)
        else:
            out.append(e)
    return out


def read_whole(reader, text: str) -> tuple[str, list[ToolCall]]:
    """The whole output at once: (content, calls)."""
    return joined(reader.feed(text, final=True))


def joined(events: list[Event]) -> tuple[str, list[ToolCall]]:
    """A reader's events, all of them: (content, calls)."""
    content, names, args = "", [], []
    for e in events:
        if e.kind == "content":
            content += e.text
        elif e.kind == "call":
            names.append(e.text)
            args.append("")
        else:
            args[e.index] += e.text
    return content, [ToolCall(n, a) for n, a in zip(names, args)]
