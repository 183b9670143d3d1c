"""The tool-call formats a model may write, and which one its chat template teaches.

A ToolFormat says where calls stand (inside Blocks of markup, or bare, after an optional prefix tag)
and which key holds a call's arguments. tool_call_reader.ToolCallReader reads output in one; the
server picks the format per model (tool_choice.ToolSupport, or `flashserve serve --tool-call-parser`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """Markup around calls: `open` ... `close`, holding one or more calls (objects or arrays)."""

    open: str
    close: str
    # a call here only if its name is one of the offered tools: for markup that also holds
    # other things (a fenced JSON block may be an answer); otherwise the block stays content
    offered_names_only: bool = False


@dataclass(frozen=True)
class ToolFormat:
    """Where a model writes its calls: JSON objects `{"name": ..., <args key>: {...}}`, or arrays of
    them, inside blocks or bare: at the start of the message, right after another call, or after
    prose when they name an offered tool."""

    blocks: tuple[Block, ...]
    prefix: str | None  # a tag that may stand before bare calls
    args_keys: tuple[str, ...]  # the first of these keys in an object holds its arguments
    # a bare object (no block, no prefix) is a call only if it names an offered tool: where the
    # format's calls are marked, a bare {"name": "John", "age": 30} is more likely an answer
    bare_offered_names_only: bool = False


# Hermes / Qwen2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, any number, with
# text around them. Qwen2.5-Coder-0.5B writes the bare object without the tags, or (more often, with
# three tools offered) a fenced ```json block of it (measured at temperature 0), so bare objects at
# the start of the message, and fenced ones anywhere, are read as calls too when they name an
# offered tool.
HERMES = ToolFormat((Block("<tool_call>", "</tool_call>"), Block("```json", "```", offered_names_only=True)),
                    None, ("arguments", "parameters"), bare_offered_names_only=True)
# Llama 3.x: `{"name": ..., "parameters": {...}}`, several separated by ';', optionally after <|python_tag|>.
LLAMA3_JSON = ToolFormat((), "<|python_tag|>", ("parameters", "arguments"))
# tool_choice "required" (structured output): [{"name": ..., "arguments": {...}}, ...]
REQUIRED = ToolFormat((), None, ("arguments",))

PARSERS = {"hermes": HERMES, "llama3_json": LLAMA3_JSON}


def parser_name_for_template(template: str | None) -> str:
    """The format a chat template teaches its model. Templates that do not render tools get
    flashserve's Hermes-style tool prompt (tool_prompt.py), so Hermes is the default."""
    if template and "<tool_call>" not in template and ("<|python_tag|>" in template or
                                                      '"parameters": dictionary' in template):
        return "llama3_json"
    return "hermes"
