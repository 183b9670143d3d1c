"""`flashserve quantize --method gguf` from a Hugging Face directory: the tensors quantize to the very
bytes the same model converted to GGUF by the tests' own converter (tests/model/tiny.py, llama.cpp's
layout) quantizes to, and the tokenizer keys are those of the GGUF the tokenizer came from."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from flashserve.errors import FlashserveError
from flashserve.quantization.gguf_export import GGUFQuantizeArgs, quantize_gguf
from flashserve.quantization.imatrix import save_imatrix
from tests.model.tiny import VOCAB, hf_tiny, save_hf, write_gguf


def _byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer of the tiny models' 256 ids: one token per byte, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(directory))


def _tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_directory_quantizes_as_its_gguf(arch, tmp_path):
    """Llama (Q/K interleaved per head, llama3 RoPE scaling as rope_freqs) and Qwen2 (q/k/v biases,
    one KV head): same tensors, types and bytes, with an importance matrix too, and the hyper-parameter
    keys the reference converter writes."""
    model = hf_tiny(arch, seed=7)
    hf = save_hf(model, tmp_path / "hf")
    _byte_tokenizer(hf)
    ref = write_gguf(model, tmp_path / "ref.gguf")
    g = np.random.default_rng(0)
    imatrix = tmp_path / "m.imatrix"
    save_imatrix(str(imatrix), {n: g.gamma(0.3, 1.0, int(t.shape[0])).astype(np.float32)
                                for n, t in _tensors(ref).items() if len(t.shape) == 2}, 10, "x")
    for name, source in (("hf", hf), ("ref", ref)):
        quantize_gguf(GGUFQuantizeArgs(model=str(source), out=str(tmp_path / f"{name}-q.gguf"), qtype="Q4_K",
                                       output_type="Q8_0", imatrix=str(imatrix)))
    got, want = _tensors(tmp_path / "hf-q.gguf"), _tensors(tmp_path / "ref-q.gguf")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].tensor_type == t.tensor_type and list(got[name].shape) == list(t.shape), name
        if name == "rope_freqs.weight":  # flashserve's and transformers' llama3 formulas, in float64
            np.testing.assert_allclose(got[name].data, t.data, rtol=1e-6)
        else:
            assert bytes(got[name].data) == bytes(t.data), name
    ours, theirs = GGUFReader(str(tmp_path / "hf-q.gguf")).fields, GGUFReader(str(ref)).fields
    for key in theirs:
        if key.startswith(f"{arch}."):
            assert ours[key].contents() == theirs[key].contents(), key
    assert ours["tokenizer.ggml.model"].contents() == "gpt2" and ours["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert ours["tokenizer.ggml.tokens"].contents()[:3] == ["!", '"', "#"]  # ids by the byte alphabet's order


@pytest.fixture(scope="module")
def smollm2_tokenizer_hf(hf_smollm2_tokenizer, tmp_path_factory) -> Path:
    """A one-layer Llama of SmolLM2's vocabulary, with SmolLM2's tokenizer as transformers saves it."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    path = save_hf(tf.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("smol") / "hf")
    hf_smollm2_tokenizer.save_pretrained(str(path))
    return path


def test_tokenizer_keys_are_those_of_the_source_gguf(smollm2_tokenizer_hf, smollm2_gguf, hf_smollm2_tokenizer,
                                                      tmp_path):
    """Tokens, types, merges, special ids, add_bos and the chat template equal the SmolLM2 GGUF's (the
    pre-tokenizer is GPT-2's: transformers writes SmolLM2's as a plain ByteLevel one), and flashserve's
    tokenizer built from the written file encodes as transformers' does."""
    from flashserve.tokenizer.tokenizer import Tokenizer

    out = tmp_path / "q.gguf"
    summary = quantize_gguf(GGUFQuantizeArgs(model=str(smollm2_tokenizer_hf), out=str(out), qtype="Q8_0"))
    assert summary["notes"] == [] and "output.weight" not in _tensors(out)  # tied: the head is token_embd
    ours, theirs = GGUFReader(str(out)).fields, GGUFReader(smollm2_gguf).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key].contents() == theirs[key].contents(), key
    assert ours["tokenizer.ggml.pre"].contents() == "gpt-2"
    text = "The licence says that you may copy 12345 <|im_start|>user\nhi<|im_end|>"
    assert Tokenizer.from_model_path(str(out)).encode(text) == hf_smollm2_tokenizer(text)["input_ids"]

    llama_cpp = pytest.importorskip("llama_cpp")
    peer = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, vocab_only=True)
    assert peer.tokenize(text.encode(), add_bos=False, special=True) == hf_smollm2_tokenizer(text)["input_ids"]


def test_refused_directories(tmp_path):
    from tokenizers import Tokenizer, models

    gemma = save_hf(hf_tiny("gemma3"), tmp_path / "gemma")
    with pytest.raises(FlashserveError, match="converting a gemma3 directory to GGUF is not supported"):
        quantize_gguf(GGUFQuantizeArgs(model=str(gemma), out=str(tmp_path / "g.gguf")))
    llama = save_hf(hf_tiny("llama"), tmp_path / "llama")
    Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0)).save(str(llama / "tokenizer.json"))  # not BPE
    with pytest.raises(FlashserveError, match="only byte-level BPE tokenizers .* this one is 'Unigram'"):
        quantize_gguf(GGUFQuantizeArgs(model=str(llama), out=str(tmp_path / "l.gguf")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma", "llama"]
