"""A push scanner over the text of one JSON value, fed a character at a time as a model writes it.

It says at every point how much of the text is settled (`certain`): a prefix that no later text
can change the meaning of, i.e. one that holds no half-written number, literal or escape and
does not end in a blank that may turn out to lie after the value. For the members of a
top-level object it records each key and where its value starts and ends, so that a reader can
cut out one member's text (a tool call's arguments) while it is still being written.

    text      {"name": "f", "arguments": {"n": 12
    certain   {"name": "f", "arguments": {"n": |       12 may yet become 123: held back
    members   [["name", 9, 12], ["arguments", 27, None]]
"""
from __future__ import annotations

import json
import re

_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LITERALS = ("true", "false", "null")
_BLANK = " \t\n\r"
_ESCAPES = '"\\/bfnrt'

OK, END, REST, BAD = "ok", "end", "rest", "bad"  # what feed() says of a character


class JsonScan:
    def __init__(self):
        self.raw: list[str] = []  # the characters taken
        self.stack: list[str] = []  # open containers, '{' or '['
        # outside strings and tokens, what comes next: value | first_value | key | first_key | colon | after
        self.expect = "value"
        self.token = ""  # in a string: '"'; an escape: '\\' or '\\u' and its hex digits; a number or literal: its text
        self.key_start = 0
        self.in_key = False
        self.certain = 0  # raw[:certain] is settled
        self.done = False
        self.members: list[list] = []  # top-level object: [key, value start, value end or None]

    def text(self, start: int = 0, end: int | None = None) -> str:
        return "".join(self.raw[start:end])

    def feed(self, ch: str) -> str:
        """OK: taken; END: taken and the value is complete; REST: not taken, the value was complete
        before it (a number ends only at the character after it); BAD: not JSON."""
        if self.done:
            return REST
        tok = self.token
        if tok[:1] in ("t", "f", "n"):  # a literal
            word = next(w for w in _LITERALS if w.startswith(tok))
            if not word.startswith(tok + ch):
                return BAD
            self.raw.append(ch)
            self.token += ch
            return self._value_end() if self.token == word else OK
        if tok[:1] and tok[0] in "-0123456789":  # a number: ends at the first character not of it
            if ch in "0123456789+-.eE":
                self.raw.append(ch)
                self.token += ch
                return OK
            if not _NUMBER.fullmatch(tok):
                return BAD
            return REST if self._value_end() == END else self.feed(ch)
        if tok:
            return self._string(ch)
        if ch in _BLANK:
            self.raw.append(ch)  # settled only when something follows it inside the value
            return OK
        return self._structure(ch)

    def _settle(self, ch: str) -> None:
        self.raw.append(ch)
        self.certain = len(self.raw)

    # ---- inside a string -------------------------------------------------------------------------
    def _string(self, ch: str) -> str:
        tok = self.token
        if tok == '"':
            if ch == "\\":
                self.token = "\\"
                self.raw.append(ch)  # held until the escape is complete
                return OK
            if ord(ch) < 0x20:
                return BAD
            self._settle(ch)
            if ch != '"':
                return OK
            self.token = ""
            if not self.in_key:
                return self._value_end()
            self.in_key = False
            if self.stack == ["{"]:
                self.members.append([json.loads(self.text(self.key_start)), None, None])
            self.expect = "colon"
            return OK
        if tok == "\\":  # the character after a backslash
            if ch == "u":
                self.token = "\\u"
            elif ch in _ESCAPES:
                self.token = '"'
            else:
                return BAD
        elif ch in "0123456789abcdefABCDEF":  # \u and its hex digits so far
            self.token = '"' if len(tok) == 5 else tok + ch
        else:
            return BAD
        if self.token == '"':
            self._settle(ch)
        else:
            self.raw.append(ch)
        return OK

    # ---- between tokens --------------------------------------------------------------------------
    def _structure(self, ch: str) -> str:
        expect, pos = self.expect, len(self.raw)
        if expect in ("key", "first_key"):
            if ch == '"':
                self.token, self.in_key, self.key_start = '"', True, pos
                self._settle(ch)
                return OK
            return self._close(ch) if ch == "}" and expect == "first_key" else BAD
        if expect == "colon":
            if ch != ":":
                return BAD
            self.expect = "value"
            self._settle(ch)
            return OK
        if expect == "after":
            if ch == ",":
                self.expect = "key" if self.stack[-1] == "{" else "value"
                self._settle(ch)
                return OK
            return self._close(ch) if ch == "}]"[self.stack[-1] == "["] else BAD
        if ch == "]" and expect == "first_value":
            return self._close(ch)
        # a value starts
        if self.stack == ["{"]:
            self.members[-1][1] = pos
        if ch in "{[":
            self.stack.append(ch)
            self.expect = "first_key" if ch == "{" else "first_value"
        elif ch == '"':
            self.token = '"'
        elif ch in "-0123456789tfn":
            self.token = ch
            self.certain = pos  # the blanks before it are settled, the token is not
            self.raw.append(ch)
            return OK
        else:
            return BAD
        self._settle(ch)
        return OK

    def _close(self, ch: str) -> str:
        self.stack.pop()
        self._settle(ch)
        return self._value_end()

    def _value_end(self) -> str:
        """The value that ends with the last character taken is complete."""
        self.token = ""
        self.certain = len(self.raw)
        if self.stack == ["{"]:
            self.members[-1][2] = len(self.raw)
        if not self.stack:
            self.done = True
            return END
        self.expect = "after"
        return OK
