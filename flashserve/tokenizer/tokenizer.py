"""Tokenizer from a GGUF file's metadata or an HF model directory.

transformers converts GGUF tokenizer metadata (BPE with its pre-tokenizer variant, or
SentencePiece-style vocabularies with scores and byte fallback) into a fast `tokenizers`
tokenizer; we use that conversion once per model file (tokenizer/cache.py keeps the result)
and call the Rust tokenizer directly.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from flashserve.errors import ModelFormatError
from flashserve.tokenizer import cache
from flashserve.tokenizer.chat_template import render_chat
from flashserve.heap import release_free_heap

logger = logging.getLogger(__name__)

# End-of-turn markers: a chat model stops at them when its template uses them.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class TokenizerSpec:
    """What the transformers tokenizer adds to the backend one: special tokens and the chat template."""

    chat_template: str | None
    bos_token: str  # "" when the model has none (what templates get)
    eos_token: str
    bos_token_id: int | None
    pad_token_id: int | None
    vocab_size: int
    all_special_ids: tuple[int, ...]
    eos_token_ids: tuple[int, ...]  # the EOS token and the end-of-turn markers the template uses

    @classmethod
    def from_hf(cls, hf) -> "TokenizerSpec":
        template = hf.chat_template if isinstance(hf.chat_template, str) else None
        eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        vocab = hf.get_vocab()
        eos += [vocab[m] for m in _END_OF_TURN if m in vocab and template and m in template]
        return cls(template, hf.bos_token or "", hf.eos_token or "", hf.bos_token_id, hf.pad_token_id, len(hf),
                   tuple(hf.all_special_ids), tuple(dict.fromkeys(eos)))

    @classmethod
    def from_json(cls, d: dict) -> "TokenizerSpec":
        return cls(**{**d, "all_special_ids": tuple(d["all_special_ids"]), "eos_token_ids": tuple(d["eos_token_ids"])})


class Tokenizer:
    def __init__(self, backend, spec: TokenizerSpec):
        self.backend = backend  # tokenizers.Tokenizer
        self.spec = spec
        self.chat_template = spec.chat_template
        self.bos_token_id = spec.bos_token_id
        self.pad_token_id = spec.pad_token_id
        self.vocab_size = spec.vocab_size
        self.all_special_ids = set(spec.all_special_ids)
        self.eos_token_ids = spec.eos_token_ids

    @classmethod
    def from_model_path(cls, path: str) -> "Tokenizer":
        """The model's tokenizer: a GGUF file's from the cache when it holds this exact file."""
        tok = cls._load_or_build(Path(path))
        release_free_heap()  # the parse's garbage: ~0.28 GiB for Gemma 3's 262k vocabulary
        return tok

    @classmethod
    def _load_or_build(cls, p: Path) -> "Tokenizer":
        if p.is_dir():
            return cls.build(p)
        hit = cache.load(p)
        if hit is not None:
            from tokenizers import Tokenizer as Backend

            try:
                return cls(Backend.from_str(hit[1]), TokenizerSpec.from_json(hit[0]))
            except Exception as exc:  # an entry that passed its digest but does not load: rebuild it
                logger.warning("tokenizer cache entry for %s does not load (%s); rebuilding", p, exc)
        tok = cls.build(p)
        cache.store(p, asdict(tok.spec), tok.backend.to_str())
        return tok

    @classmethod
    def build(cls, path: str | Path) -> "Tokenizer":
        """Built now by transformers from a model directory or a GGUF file, never cached (seconds)."""
        hf = _build_hf(Path(path))
        return cls(hf.backend_tokenizer, TokenizerSpec.from_hf(hf))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return render_chat(self.chat_template, messages, bos_token=self.spec.bos_token,
                           eos_token=self.spec.eos_token, add_generation_prompt=add_generation_prompt, **kwargs)


def _build_hf(p: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if p.is_dir():
            return AutoTokenizer.from_pretrained(str(p))
        # The generic fast class builds the same backend tokenizer from the GGUF metadata;
        # AutoTokenizer would first parse the whole file with gguf's reader just to pick a
        # model-specific class (27 s instead of 5 s for Gemma 3's vocabulary, measured).
        return PreTrainedTokenizerFast.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as exc:  # transformers raises many kinds for unusable tokenizer data
        raise ModelFormatError(f"{p}: cannot build a tokenizer ({type(exc).__name__}: {exc})") from None
