"""One JSON object a tool-call reader (tool_call_reader.py) is reading that may be a call.

It tells, character by character, whether the object can still be a call (its name, if offered, and
how its arguments begin), when it surely is one (ready), and which of its arguments' text is settled
(take_args). Only the reader uses it.
"""
from __future__ import annotations

import json

from flashserve.entrypoints.openai.json_scan import BAD, JsonScan

NOT_A_CALL = "not a call"


class CallObject:
    """One JSON object that may be a call, keys in any order. `index` is set once it is one."""

    def __init__(self, args_keys: tuple[str, ...], names: frozenset[str] | None, name_first: bool = False):
        self.scan = JsonScan()
        self.args_keys = args_keys
        self.names = names  # the names it may call; None: any
        self.name_first = name_first  # a call only if "name" is its first key
        self.name: str | None = None
        self.string_args: str | None = None  # arguments written as a JSON string, decoded
        self.index: int | None = None  # None: not (yet) a call
        self.committed = False
        self.sent = 0  # characters of the arguments given out

    def feed(self, ch: str) -> str:
        status = self.scan.feed(ch)
        if status == BAD or self.committed:
            return status
        return status if self._may_be_call() else NOT_A_CALL

    def _member(self, keys) -> list | None:
        return next((m for m in self.scan.members if m[0] in keys), None)

    def _may_be_call(self) -> bool:
        raw = self.scan.raw
        if self.name_first and self.scan.members and self.scan.members[0][0] != "name":
            return False
        name = self._member(("name",))
        if name is not None and name[1] is not None and self.name is None:
            if raw[name[1]] != '"':
                return False
            if name[2] is not None:
                self.name = json.loads(self.scan.text(name[1], name[2]))
                if not self.name or (self.names is not None and self.name not in self.names):
                    return False
        args = self._member(self.args_keys)
        if args is not None and args[1] is not None and self.string_args is None:
            if raw[args[1]] not in '{"':
                return False
            if raw[args[1]] == '"' and args[2] is not None:
                self.string_args = json.loads(self.scan.text(args[1], args[2]))
                try:
                    if not isinstance(json.loads(self.string_args), dict):
                        return False
                except json.JSONDecodeError:
                    return False
        return not (self.scan.done and self.name is None)

    def ready(self) -> bool:
        """A call for certain: the name is complete and it is known how the arguments begin."""
        if self.name is None:
            return False
        args = self._member(self.args_keys)
        if args is None:
            return self.scan.done
        return args[1] is not None and (self.scan.raw[args[1]] == "{" or self.string_args is not None)

    def take_args(self) -> str:
        """The arguments' text settled since the last take."""
        args = self._member(self.args_keys)
        if args is None or self.string_args is not None:
            text = self.string_args if args is not None else "{}" if self.scan.done else ""
            piece, self.sent = text[self.sent:], len(text)
            return piece
        end = args[2] if args[2] is not None else self.scan.certain
        piece = self.scan.text(args[1] + self.sent, end)
        self.sent = end - args[1]
        return piece
