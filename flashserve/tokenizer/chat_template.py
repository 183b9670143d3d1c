"""Chat templates: the model's jinja2 template rendered in a sandbox, with the helpers
that Hugging Face templates expect (raise_exception, strftime_now, tojson)."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    # jinja2 is imported here, not at the top: a plain completion never renders a template.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False: json.dumps(v, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, tools: list | None = None, **kwargs) -> str:
    from jinja2.exceptions import TemplateError

    if not template:
        raise ValueError("this model has no chat template; send a plain prompt to the completions API instead")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} needs a 'role'")
    try:
        return _compile(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                         add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
    except TemplateError as exc:
        raise ValueError(f"chat template error: {exc}") from None
