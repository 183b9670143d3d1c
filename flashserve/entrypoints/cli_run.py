"""The subcommands that run a model: env, fetch, generate, chat and serve (the parser is cli.py's,
each group adds its subcommands to it). Their flags are cli_flags.py's."""
from __future__ import annotations

import sys
from dataclasses import replace

from flashserve import startup_phases
from flashserve.entrypoints.cli_flags import (add_engine_args, add_model_args, add_sampling_args, engine_args_from,
                                              sampling_params_from)
from flashserve.entrypoints.openai.tool_formats import PARSERS


def add_run_commands(sub) -> None:
    """env, fetch, generate, chat and serve, on the subparsers `sub`."""
    p = sub.add_parser("env", help="this CPU's features, the kernels built for it, and the dtype chosen for a model")
    add_model_args(p)
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("fetch", help="download a built-in model into the cache and print its path")
    p.add_argument("name")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("generate", help="complete one prompt, streaming the text")
    add_engine_args(p, max_num_seqs=1)
    add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    add_engine_args(p, max_num_seqs=1)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="optional system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-waiting", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="the format of the model's tool calls (default: read from its chat template)")
    p.set_defaults(func=cmd_serve)


def _stream(engine, prompt, params) -> str:
    """Run one request, printing text as it arrives; returns the whole text."""
    rid = engine.next_request_id()
    engine.add_request(rid, prompt, params)
    shown, first = "", True
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first and out.outputs[0].token_ids:
                startup_phases.mark("first token (prompt's prefill)")
                first = False
            text = out.outputs[0].text
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    startup_phases.mark("the other tokens")
    sys.stdout.write("\n")
    return shown


def cmd_fetch(a) -> None:
    from flashserve.model.catalogue import fetch

    print(fetch(a.name))


def _fit_context(config, num_tokens: int):
    """The engine config with its context cut to `num_tokens` (never raised): the KV pool is sized
    for max_num_seqs full contexts, and a one-shot request can never use more than its own."""
    sc = config.scheduler
    return replace(config, scheduler=replace(sc, max_model_len=min(sc.max_model_len, num_tokens)))


def one_shot_engine(a):
    """(engine, sampling params) of `generate`: a KV pool for the prompt and max_tokens, no more.
    The tokenizer comes first, before torch is imported: its parse's transient garbage (returned to
    the OS once it is built) then never stacks on torch's own memory in the process's peak."""
    from flashserve.model.catalogue import resolve
    from flashserve.tokenizer.tokenizer import Tokenizer

    startup_phases.mark("interpreter and CLI imports")
    tokenizer = Tokenizer.from_model_path(str(resolve(a.model)))
    startup_phases.mark("tokenizer (GGUF header check, cached vocabulary)")
    from flashserve.engine.llm_engine import LLMEngine

    startup_phases.mark("torch and engine imports")
    params = sampling_params_from(a)
    config = engine_args_from(a).create_engine_config()
    config = _fit_context(config, len(tokenizer.encode(a.prompt)) + params.max_tokens)
    startup_phases.mark("engine config (GGUF metadata)")
    return LLMEngine(config, tokenizer=tokenizer), params


def cmd_generate(a) -> None:
    engine, params = one_shot_engine(a)
    try:
        _stream(engine, a.prompt, params)
    finally:
        engine.shutdown()  # workers, if any, stopped here: the `flashserve` command then exits at once (cli.run)


def cmd_chat(a) -> None:
    from flashserve.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(engine_args_from(a))
    tok = engine.tokenizer
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("flashserve chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        reply = _stream(engine, {"prompt_token_ids": prompt_ids}, sampling_params_from(a))
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(a) -> None:
    from flashserve.entrypoints.openai.app import run_server

    run_server(engine_args_from(a), host=a.host, port=a.port, api_key=a.api_key, max_waiting=a.max_waiting,
               tool_call_parser=a.tool_call_parser)


def cmd_env(a) -> None:
    from flashserve.entrypoints.env import environment_report

    print("\n".join(environment_report(a.model, a.dtype, a.quantization)))
