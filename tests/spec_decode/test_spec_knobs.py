"""The speculative decoding knobs are flags of generate, chat and serve and reach the engine config."""
from __future__ import annotations

import pytest

from flashserve.entrypoints.cli import build_parser
from flashserve.entrypoints.cli_flags import engine_args_from


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_spec_flags_reach_the_engine_config(command, smollm2_gguf):
    extra = ["--prompt", "x"] if command == "generate" else []
    a = build_parser().parse_args([command, *extra, "--model", smollm2_gguf, "--speculative-method", "ngram",
                                   "--num-speculative-tokens", "6", "--prompt-lookup-min", "2",
                                   "--prompt-lookup-max", "5"])
    s = engine_args_from(a).create_engine_config().speculative
    assert (s.method, s.num_speculative_tokens, s.prompt_lookup_min, s.prompt_lookup_max) == ("ngram", 6, 2, 5)


def test_off_by_default():
    a = build_parser().parse_args(["serve"])
    assert engine_args_from(a).speculative_method is None


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_draft_model_flags_and_json_reach_the_engine_config(command, smollm2_gguf):
    """The flat flags and vLLM's --speculative-config JSON give the same SpeculativeConfig."""
    extra = ["--prompt", "x"] if command == "generate" else []
    flat = build_parser().parse_args([command, *extra, "--model", smollm2_gguf, "--speculative-method", "draft_model",
                                      "--speculative-model", smollm2_gguf, "--num-speculative-tokens", "3"])
    nested = build_parser().parse_args([command, *extra, "--model", smollm2_gguf, "--speculative-config",
                                        f'{{"model": "{smollm2_gguf}", "num_speculative_tokens": 3}}'])
    a, b = (engine_args_from(x).create_engine_config().speculative for x in (flat, nested))
    assert a == b
    assert (a.method, a.num_speculative_tokens, a.draft_model_path) == ("draft_model", 3, smollm2_gguf)


def test_speculative_config_must_be_a_json_object(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative-config", "[1, 2]"])
    assert "expected a JSON object" in capsys.readouterr().err
