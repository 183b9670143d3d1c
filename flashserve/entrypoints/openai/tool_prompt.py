"""Chat messages with tools → the messages and tools a chat template renders.

A template that renders tools itself (Qwen2.5, Llama 3.1, ...) gets them as Hugging Face
templates expect: the tool list as `tools`, an assistant's calls as `tool_calls` with the
arguments as an object (OpenAI sends them as JSON text), tool results as `tool` messages.

A template that ignores `tools` (SmolLM2's) would silently drop them, and the model would never
hear of the tools it is asked to call. Such a template gets them as plain text in the Hermes
style instead: the tool list and the call format in the system message, earlier calls as
`<tool_call>` blocks in the assistant's text, results as `<tool_response>` blocks in a user turn.
Hermes is the format most small open models were tuned on, and it is the one the Hermes parser
reads back, so the prompt and the parser agree.
"""
from __future__ import annotations

import json

from flashserve.errors import InvalidRequestError

_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_7f3a", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template puts a tool list into the prompt (rendered once, at start-up)."""
    messages = [{"role": "user", "content": "hi"}]
    try:
        with_tool = tokenizer.apply_chat_template(messages, tools=[_PROBE_TOOL])
        return with_tool != tokenizer.apply_chat_template(messages)
    except ValueError:  # no template, or one that rejects this: chat requests report it themselves
        return False


def hermes_system_text(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _text(content) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _arguments(i: int, call) -> dict:
    try:
        args = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        raise InvalidRequestError(f"messages[{i}]: the arguments of tool call {call.id!r} are not valid JSON") from None
    if not isinstance(args, dict):
        raise InvalidRequestError(f"messages[{i}]: the arguments of tool call {call.id!r} are not a JSON object")
    return args


def template_messages(messages, tools: list[dict] | None, native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the template from the request's ChatMessages and tool dicts (None: no tools)."""
    out: list[dict] = []
    after_result = False  # the last message out is a user turn made of tool results
    for i, m in enumerate(messages):
        d = {"role": m.role, "content": _text(m.content)}
        if m.name is not None:
            d["name"] = m.name
        calls = [(c, _arguments(i, c)) for c in m.tool_calls or ()]
        if native:
            if calls:
                d["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": args}} for c, args in calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
        elif calls:
            blocks = [json.dumps({"name": c.function.name, "arguments": args}, ensure_ascii=False) for c, args in calls]
            d["content"] = "\n".join(([d["content"]] if d["content"] else []) +
                                     [f"<tool_call>\n{b}\n</tool_call>" for b in blocks])
        elif m.role == "tool":
            block = f"<tool_response>\n{d['content']}\n</tool_response>"
            if after_result:  # consecutive results share one user turn
                out[-1]["content"] += "\n" + block
                continue
            d = {"role": "user", "content": block}
        after_result = not native and m.role == "tool"
        out.append(d)
    if not native:
        if tools:
            if out and out[0]["role"] in ("system", "developer"):
                out[0]["content"] = (out[0]["content"] + "\n\n" if out[0]["content"] else "") + hermes_system_text(tools)
            else:
                out.insert(0, {"role": "system", "content": hermes_system_text(tools)})
        return out, None
    return out, tools
