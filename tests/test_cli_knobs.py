"""Every engine knob the README lists is a flag of generate, chat and serve, and reaches the engine config."""
from __future__ import annotations

from dataclasses import fields

import pytest

from flashserve.engine.arg_utils import EngineArgs
from flashserve.entrypoints.cli import build_parser
from flashserve.entrypoints.cli_flags import engine_args_from


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_defaults_are_engine_args_defaults(command):
    extra = ["--prompt", "x"] if command == "generate" else []
    args = engine_args_from(build_parser().parse_args([command, *extra]))
    want = EngineArgs(max_num_seqs=1 if command != "serve" else EngineArgs().max_num_seqs)
    assert args == want


def test_every_knob_reaches_the_engine_config(smollm2_gguf):
    a = build_parser().parse_args([
        "serve", "--model", smollm2_gguf, "--dtype", "float32", "--quantization", "weight-only",
        "--max-model-len", "512", "--max-num-seqs", "3", "--max-num-batched-tokens", "256", "--block-size", "32",
        "--kv-cache-memory", "1000000", "--kv-cache-fraction", "0.5", "--kv-cache-dtype", "int8",
        "--no-enable-prefix-caching", "--scheduling", "static", "--policy", "priority", "--threads", "1",
        "--seed", "7", "--swap-space", "5000000", "--preemption-mode", "swap", "--max-weight-memory", "300000000"])
    args = engine_args_from(a)
    assert {f.name for f in fields(EngineArgs)} <= set(vars(a))  # no field silently left at its default
    c = args.create_engine_config()
    assert (c.dtype, c.quantization, c.seed, c.num_threads, c.max_weight_memory) == (
        "float32", "weight-only", 7, 1, 300000000)
    assert (c.cache.block_size, c.cache.kv_cache_memory, c.cache.kv_cache_fraction, c.cache.kv_cache_dtype,
            c.cache.enable_prefix_caching, c.cache.swap_space) == (32, 1000000, 0.5, "int8", False, 5000000)
    s = c.scheduler
    assert (s.max_model_len, s.max_num_seqs, s.max_num_batched_tokens, s.scheduling, s.policy, s.preemption_mode) == (
        512, 3, 256, "static", "priority", "swap")


def test_swap_knobs_are_checked(smollm2_gguf):
    with pytest.raises(ValueError, match="preemption_mode 'swap' needs a swap space"):
        EngineArgs(model=smollm2_gguf, preemption_mode="swap").create_engine_config()
    with pytest.raises(ValueError, match="unknown preemption_mode 'lazy'"):
        EngineArgs(model=smollm2_gguf, preemption_mode="lazy").create_engine_config()
    with pytest.raises(ValueError, match="swap_space must be >= 0"):
        EngineArgs(model=smollm2_gguf, swap_space=-1).create_engine_config()


def test_old_no_prefix_caching_spelling_still_works():
    a = build_parser().parse_args(["serve", "--no-prefix-caching"])
    assert engine_args_from(a).enable_prefix_caching is False
    assert engine_args_from(build_parser().parse_args(["serve"])).enable_prefix_caching is True


def test_unknown_policy_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--policy", "lifo"])
    assert "invalid choice" in capsys.readouterr().err
