"""Tokenizer from GGUF metadata against transformers' GGUF tokenizer (and llama.cpp's own
tokenizer when llama-cpp-python is installed); chat templates; streaming detokenization."""
from __future__ import annotations

import pytest

from flashserve.tokenizer.detokenizer import IncrementalDetokenizer
from flashserve.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "def f(x):\n\treturn x ** 2  # square\n",
    "naïve café — “quotes” and ünïcödé",
    "日本語のテキストと中文混合",
    "emoji 🤗🚀 and 👩‍👩‍👧 family",
    "   leading spaces,\n\n\nnewlines   and    runs\t\ttabs",
    "numbers 1234567890 3.14159 -42",
    "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>model\nok<end_of_turn>",
]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def both(request):
    path = request.getfixturevalue(f"{request.param}_gguf")
    return request.param, Tokenizer.from_model_path(path), request.getfixturevalue(f"hf_{request.param}_tokenizer")


@pytest.mark.slow
def test_ids_equal_transformers(both):
    _, ours, hf = both
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_add_bos_rules_follow_the_gguf_metadata(both):
    name, ours, _ = both
    ids = ours.encode("hi")
    if name == "gemma3":  # tokenizer.ggml.add_bos_token = true
        assert ids[0] == ours.bos_token_id == 2
    else:  # SmolLM2: add_bos_token = false
        assert ids[0] != ours.bos_token_id


@pytest.mark.slow
def test_special_tokens_are_single_ids_and_end_turns_stop(both):
    name, ours, _ = both
    if name == "smollm2":
        assert ours.encode("<|im_start|>", add_special_tokens=False) == [1]
        assert 2 in ours.eos_token_ids
    else:
        assert 1 in ours.eos_token_ids


LLAMACPP_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")


@pytest.mark.slow
@pytest.mark.parametrize("name", LLAMACPP_MODELS)
def test_ids_equal_llama_cpp_tokenizer(name):
    """An independent implementation of the same GGUF vocabulary: llama.cpp's ids, stored in
    llamacpp_ids.json by make_llamacpp_ids.py (its docstring has the command), and asked live too
    when llama-cpp-python is installed."""
    import json
    from pathlib import Path

    from flashserve.model.catalogue import fetch

    stored = json.loads(Path(__file__).with_name("llamacpp_ids.json").read_text())["ids"][name]
    assert sorted(stored) == sorted(TEXTS[1:])
    path = str(fetch(name))
    ours = Tokenizer.from_model_path(path)
    for text in TEXTS[1:]:
        assert ours.encode(text, add_special_tokens=False) == stored[text], text
    try:
        import llama_cpp
    except ImportError:
        return
    ref = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    for text in TEXTS[1:]:
        assert ref.tokenize(text.encode(), add_bos=False, special=True) == stored[text], text


@pytest.mark.slow
def test_round_trip(both):
    _, ours, _ = both
    for text in TEXTS[1:8]:
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@pytest.mark.slow
def test_streaming_detokenizer_never_shows_broken_characters(both):
    _, ours, _ = both
    prompt = ours.encode("Say:")
    for text in TEXTS[1:8]:
        ids = ours.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(ours, prompt, skip_special_tokens=True)
        for t in ids:
            detok.add_tokens([t])
            assert "\ufffd" not in detok.text
        assert detok.text == ours.decode(prompt[-5:] + ids)[len(ours.decode(prompt[-5:])):]
        assert detok.token_ids == ids


@pytest.mark.slow
def test_chat_template_matches_transformers(smollm2_gguf, hf_smollm2_tokenizer):
    hf = hf_smollm2_tokenizer
    ours = Tokenizer.from_model_path(smollm2_gguf)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    for add in (True, False):
        assert ours.apply_chat_template(conv, add_generation_prompt=add) == hf.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=add)


@pytest.mark.slow
def test_hf_directory_gives_the_same_ids(smollm2_gguf, hf_smollm2_tokenizer, tmp_path):
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    a, b = Tokenizer.from_model_path(smollm2_gguf), Tokenizer.from_model_path(str(tmp_path))
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)
    assert a.eos_token_ids == b.eos_token_ids


def test_model_without_chat_template_gives_a_clear_error():
    from flashserve.tokenizer.chat_template import render_chat

    with pytest.raises(ValueError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])
