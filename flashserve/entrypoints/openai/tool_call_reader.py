"""Model output text → content and tool calls, read as the model writes it, in one ToolFormat
(tool_formats.py). The chat endpoint makes a reader per output through tool_choice.ToolPlan.

A reader is made per output and fed the text generated so far after every step; it answers with
the events that text settles, in order: a piece of content, the start of a call (its index and
function name), a piece of a call's arguments. A stream sends each event once, and a reply that
does not stream feeds the whole text at once; both join the same pieces, whatever the chunking
(tests/server/test_tool_call_reader.py feeds every split). So an event is given out only when no
later text can take it back:

- content is held while it may still turn out to be markup (a half-written `<tool_call>`), and
  a blank while it may still turn out to lie next to a call;
- a bare JSON object (no tags) is read as a call at the start of the message or right after a
  call, and after prose ("Let me check. {"name": ...}") if it names an offered tool and "name"
  is its first key (every family writes the name first; a JSON answer in prose that begins with
  another key is content as soon as that key is read, so its text is not held to its end);
- a JSON object becomes a call once its function name is complete and its arguments have begun
  as an object (or ended, as a JSON string holding one; or the object closed without any);
  until then all of it is held, and if it proves to be no call, it is content as written;
- the arguments are the model's own text of that object, given out as far as it is settled
  (json_scan.py): no half number, literal or escape, no trailing blank;
- once given out, a call stays one. If its JSON breaks later, its arguments end where they had
  got to (as a call cut short by max_tokens does) and the rest of its block is dropped: to
  `</tool_call>`, or to the end of the message for calls written without tags.

Content around calls loses the blanks next to them, and the runs of content on either side of a
call are joined by a newline. A reader with `max_calls` (1 under parallel_tool_calls=false) reads
no further once it has given out that many calls and the last of them has ended (its JSON closed
or broken): it is then `complete`, and the server ends the request there, so that the model
spends no tokens on text nobody reads and a stream and a reply read the same text.
"""
from __future__ import annotations

from flashserve.entrypoints.openai.json_scan import BAD, END, REST, JsonScan
from flashserve.entrypoints.openai.tool_call_events import Event, merged
from flashserve.entrypoints.openai.tool_call_object import NOT_A_CALL, CallObject
from flashserve.entrypoints.openai.tool_formats import Block, ToolFormat

BLANK = " \t\n\r"


class ToolCallReader:
    """Reads one output in a ToolFormat; feed() it the whole text so far after every step."""

    def __init__(self, fmt: ToolFormat, max_calls: int | None = None, tool_names=()):
        """tool_names: the offered tools, the only names a call may have where the format says
        offered_names_only (fenced blocks, Hermes' bare objects)."""
        self.fmt = fmt
        self.max_calls = max_calls
        self.tool_names = frozenset(tool_names)
        self.fed = 0  # characters of the text read
        self.events: list[Event] = []
        self.calls = 0  # calls given out
        # content
        self.emitted = False  # some content given out
        self.blank = ""  # blanks held: given out before more content, dropped next to a call
        self.after_call = False  # a call since the last content: the next content starts a new run
        self.tag = ""  # what may be the start of a tag
        # the attempt at calls under way: a block, or a bare object or array
        self.state = "content"  # content | tag | prefixed | block | close | array | object | drop | json
        self.pending: list[str] = []  # its text, content after all if it holds no call
        self.attempt_calls = 0
        self.block: Block | None = None
        self.names: frozenset[str] | None = None  # the names a call in it may have; None: any
        self.name_first = False  # a call in it must begin with its "name" key
        self.in_array = False
        self.array_expect = ""  # in an array: first | item | after
        self.obj: CallObject | None = None
        self.value_at = 0  # where in pending its outermost JSON value starts
        self.rest: JsonScan | None = None  # state "json": the value that proved no call, read to its end

    @property
    def complete(self) -> bool:
        """The output needs no more text: max_calls calls are out and the last has ended."""
        return self.max_calls is not None and self.calls >= self.max_calls and self.obj is None

    def feed(self, text: str, final: bool) -> list[Event]:
        assert len(text) >= self.fed, "the output text only grows"
        for ch in text[self.fed:]:
            if self.complete:
                break
            self._char(ch)
        self.fed = len(text)
        if final:
            self._end()
        elif self.obj is not None:
            self._take_args()
        events, self.events = merged(self.events), []
        return events

    # ---- content -----------------------------------------------------------------------------
    def _at_call_start(self) -> bool:
        return not self.emitted or self.after_call

    def _content(self, ch: str) -> None:
        if ch in BLANK or (ch == ";" and self.after_call):
            self.blank += ch
            return
        lead = ("\n" if self.emitted else "") if self.after_call else self.blank
        self.events.append(Event("content", 0, lead + ch))
        self.blank, self.after_call, self.emitted = "", False, True

    def _tags(self) -> list[str]:
        tags = [b.open for b in self.fmt.blocks]
        return tags + [self.fmt.prefix] if self.fmt.prefix and self._at_call_start() else tags

    def _char(self, ch: str) -> None:
        state = self.state
        if state == "content":
            if any(t.startswith(ch) for t in self._tags()):
                self.state, self.tag = "tag", ch
            elif ch in "{[" and self._at_call_start():
                self._begin([], None, self.fmt.bare_offered_names_only)
                self._value_start(ch)
            elif ch in "{[" and self.tool_names:  # perhaps a bare call after prose
                self._begin([], None, offered_names_only=True, name_first=True)
                self._value_start(ch)
            else:
                self._content(ch)
        elif state == "tag":
            self._tag_char(ch)
        elif state == "prefixed":  # after the prefix tag: blanks, then an object or array
            if ch in "{[":
                self._value_start(ch)
            elif ch in BLANK:
                self.pending.append(ch)
            else:
                self._break(ch, taken=False)
        elif state == "block":
            self._between(ch)
        elif state == "close":
            self._close_char(ch)
        elif state == "array":
            self._array_char(ch)
        elif state == "object":
            self._object_char(ch)
        elif state == "json":
            self._json_content_char(ch)
        else:  # drop: the rest of a broken block (to its close), or of the message
            if self.block is not None:
                self.tag = (self.tag + ch)[-len(self.block.close):]
                if self.tag == self.block.close:
                    self.state, self.tag, self.after_call = "content", "", True

    def _tag_char(self, ch: str) -> None:
        held = self.tag + ch
        tags = self._tags()
        if held in tags:
            self.tag = ""
            block = next((b for b in self.fmt.blocks if b.open == held), None)
            self._begin(list(held), block, block is not None and block.offered_names_only)
            self.state = "prefixed" if self.block is None else "block"
        elif any(t.startswith(held) for t in tags):
            self.tag = held
        else:  # no tag: its first character is content, the rest is read again
            self.state, self.tag = "content", ""
            self._content(held[0])
            for c in held[1:]:
                self._char(c)

    # ---- attempts at calls -------------------------------------------------------------------
    def _begin(self, pending: list[str], block: Block | None, offered_names_only: bool,
               name_first: bool = False) -> None:
        self.pending, self.attempt_calls, self.block = pending, 0, block
        self.names = self.tool_names if offered_names_only else None  # what a call here may name
        self.name_first = name_first

    def _value_start(self, ch: str) -> None:
        if self.state != "array":
            self.value_at = len(self.pending)
        self.pending.append(ch)
        if ch == "[":
            self.state, self.in_array, self.array_expect = "array", True, "first"
        else:
            self.state, self.obj = "object", CallObject(self.fmt.args_keys, self.names, self.name_first)
            self.obj.feed(ch)

    def _between(self, ch: str) -> None:
        """Inside a block, between calls."""
        if ch in "{[":
            self._value_start(ch)
        elif ch in BLANK or ch == ";":
            self.pending.append(ch)
        elif ch == self.block.close[0]:
            self.pending.append(ch)
            self.state, self.tag = "close", ch
        else:
            self._break(ch, taken=False)

    def _close_char(self, ch: str) -> None:
        held = self.tag + ch
        if held == self.block.close:
            self.tag = ""
            self.pending.append(ch)
            self._attempt_over()
        elif self.block.close.startswith(held):
            self.tag = held
            self.pending.append(ch)
        else:
            self.tag = ""
            self._break(ch, taken=False)

    def _array_char(self, ch: str) -> None:
        expect = self.array_expect
        if ch == "{" and expect in ("first", "item"):
            self._value_start(ch)
        elif ch in BLANK:
            self.pending.append(ch)
        elif ch == "," and expect == "after":
            self.pending.append(ch)
            self.array_expect = "item"
        elif ch == "]" and expect in ("first", "after"):
            self.pending.append(ch)
            self.in_array = False
            self._value_over()
        else:
            self._break(ch, taken=False)

    def _object_char(self, ch: str) -> None:
        obj = self.obj
        status = obj.feed(ch)
        if status == BAD:
            self._break(ch, taken=False)
            return
        self.pending.append(ch)
        if status == NOT_A_CALL:
            self._break(ch, taken=True)
            return
        if not obj.committed and obj.ready():
            self._commit(obj)
        if status == END:
            self._take_args()
            self.obj = None
            self._value_over()

    def _commit(self, obj: CallObject) -> None:
        obj.committed = True
        self.attempt_calls += 1
        self.pending, self.blank, self.after_call = [], "", True
        obj.index, self.calls = self.calls, self.calls + 1
        self.events.append(Event("call", obj.index, obj.name))

    def _take_args(self) -> None:
        obj = self.obj
        if obj is not None and obj.index is not None:
            piece = obj.take_args()
            if piece:
                self.events.append(Event("args", obj.index, piece))

    def _value_over(self) -> None:
        """An object or array is complete: back to what holds it."""
        if self.in_array:
            self.state, self.array_expect = "array", "after"
        elif self.block is not None:
            self.state = "block"
        else:
            self._attempt_over()

    def _attempt_over(self) -> None:
        if self.attempt_calls:
            self.state, self.after_call = "content", True
        else:
            self._revert()

    def _revert(self) -> None:
        """The attempt holds no call: its text is content as written."""
        pending, self.pending = self.pending, []
        self.state, self.obj, self.in_array = "content", None, False
        for c in pending:
            self._content(c)

    def _break(self, ch: str, taken: bool) -> None:
        """The attempt's text is no call from ch on (taken: ch is in its pending text)."""
        if self.obj is not None and self.obj.committed:
            self._take_args()
        self.obj, self.in_array = None, False
        if not self.attempt_calls:
            rest = self._value_scan() if taken else None  # taken: the text is JSON still, and no call
            self._revert()
            if rest is not None and not rest.done:
                self.state, self.rest = "json", rest
            if not taken:
                self._char(ch)
            return
        self.state, self.tag = "drop", ""
        if not taken:
            self._char(ch)

    def _value_scan(self) -> JsonScan:
        """A scanner that has read the attempt's outermost value so far."""
        scan = JsonScan()
        for c in self.pending[self.value_at:]:
            scan.feed(c)
        return scan

    def _json_content_char(self, ch: str) -> None:
        """The rest of a JSON value that proved no call is content, and nothing inside it is a call
        (`{"a": {"name": "get_time", ...}}` is an answer holding a call's shape, not a call)."""
        status = self.rest.feed(ch)
        if status in (BAD, REST):
            self.state, self.rest = "content", None
            self._char(ch)
            return
        self._content(ch)
        if status == END:
            self.state, self.rest = "content", None

    def _end(self) -> None:
        if self.state == "tag":
            self.state, held, self.tag = "content", self.tag, ""
            for c in held:
                self._content(c)
        elif self.state not in ("content", "drop", "json"):
            if self.obj is not None and self.obj.committed:
                self._take_args()
            if not self.attempt_calls:
                self._revert()
        if not self.after_call:
            self._content_end()

    def _content_end(self) -> None:
        if self.blank:
            self.events.append(Event("content", 0, self.blank))
            self.blank = ""

