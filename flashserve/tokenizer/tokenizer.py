"""Tokenizer from a GGUF file's metadata or an HF model directory.

transformers converts GGUF tokenizer metadata (BPE with its pre-tokenizer variant, or
SentencePiece-style vocabularies with scores and byte fallback) into a fast `tokenizers`
tokenizer; we use that conversion and call the Rust tokenizer directly on the hot path.
"""
from __future__ import annotations

import logging
from pathlib import Path

from flashserve.errors import ModelFormatError
from flashserve.tokenizer.chat_template import render_chat

logger = logging.getLogger(__name__)

# End-of-turn markers: a chat model stops at them when its template uses them.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.backend = hf_tokenizer.backend_tokenizer  # tokenizers.Tokenizer
        self.chat_template: str | None = hf_tokenizer.chat_template if isinstance(
            hf_tokenizer.chat_template, str) else None
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.pad_token_id: int | None = hf_tokenizer.pad_token_id
        self.vocab_size = len(hf_tokenizer)
        self.all_special_ids = set(hf_tokenizer.all_special_ids)
        eos = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        vocab = hf_tokenizer.get_vocab()
        for marker in _END_OF_TURN:
            if marker in vocab and self.chat_template and marker in self.chat_template:
                eos.append(vocab[marker])
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

    @classmethod
    def from_model_path(cls, path: str) -> "Tokenizer":
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        p = Path(path)
        try:
            if p.is_dir():
                hf = AutoTokenizer.from_pretrained(str(p))
            else:
                # The generic fast class builds the same backend tokenizer from the GGUF metadata;
                # AutoTokenizer would first parse the whole file with gguf's reader just to pick a
                # model-specific class (27 s instead of 5 s for Gemma 3's vocabulary, measured).
                hf = PreTrainedTokenizerFast.from_pretrained(str(p.parent), gguf_file=p.name)
        except Exception as exc:  # transformers raises many kinds for unusable tokenizer data
            raise ModelFormatError(f"{path}: cannot build a tokenizer ({type(exc).__name__}: {exc})") from None
        return cls(hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return render_chat(self.chat_template, messages, bos_token=self.hf.bos_token or "",
                           eos_token=self.hf.eos_token or "", add_generation_prompt=add_generation_prompt, **kwargs)
