"""Command line: flashserve env | fetch | generate | chat | serve (cli_run.py) | quantize | imatrix |
profile-neurons (cli_model_tools.py) | bench | train-heads (passed through to their scripts, here).
The `flashserve` console script and `python -m flashserve.entrypoints.cli` run main()."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from flashserve.entrypoints.cli_model_tools import add_model_tool_commands
from flashserve.entrypoints.cli_run import add_run_commands
from flashserve.errors import FlashserveError


def cmd_bench(a) -> None:
    """Runs benchmarks/bench.py with every argument after `bench`, or benchmarks/startup.py for
    `bench --startup` (a source checkout has them)."""
    name = "startup.py" if "--startup" in a.bench_args else "bench.py"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / name
    if not script.is_file():
        raise FlashserveError(f"flashserve bench runs benchmarks/{name}, which only a source checkout of flashserve has")
    sys.exit(subprocess.call([sys.executable, str(script), *(x for x in a.bench_args if x != "--startup")]))


def cmd_train_heads(a) -> None:
    """python -m flashserve.spec_decode.train with every argument after `train-heads`."""
    from flashserve.spec_decode.train import main as train_main

    train_main(a.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashserve", description="LLM inference and serving")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)
    add_model_tool_commands(sub)

    # Its options (see `flashserve bench --help`) belong to benchmarks/bench.py and pass through unparsed;
    # `flashserve bench --startup [--help]` runs benchmarks/startup.py instead.
    p = sub.add_parser("bench", add_help=False, help="the CPU benchmark table: flashserve beside llama.cpp and "
                                                     "transformers (--startup: start-up time and memory)")
    p.set_defaults(func=cmd_bench)

    # Its options (see `flashserve train-heads --help`) belong to flashserve/spec_decode/train.py.
    p = sub.add_parser("train-heads", add_help=False, help="train Medusa heads or an EAGLE layer on a model's own "
                                                           "answers, for speculative decoding")
    p.set_defaults(func=cmd_train_heads)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("bench", "train-heads"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    try:
        args.func(args)
    except (FlashserveError, ValueError) as exc:
        print(f"flashserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


# One-shot commands whose engine is shut down when they return: their process can end without the
# interpreter's teardown, which frees every module and tensor one by one (0.22-0.25 s of a 1.8-3.2 s
# `generate`, benchmarks/RESULTS.md).
QUICK_EXIT = frozenset({"generate"})


def run() -> None:
    """The `flashserve` command: main(), then for a one-shot command a quick exit once what it
    printed is flushed (main() itself returns, for callers in a process that goes on)."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv[:1] and argv[0] in QUICK_EXIT:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
