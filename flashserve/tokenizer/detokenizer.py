"""Incremental detokenization that never shows half a UTF-8 character.

Decoding token by token breaks multi-byte characters split over byte tokens and loses
SentencePiece's word-boundary spaces. Instead decode a short window: the text of
tokens [prefix, read) is already shown; decode [prefix, end) and emit the difference,
unless it ends in U+FFFD (an incomplete character: wait for the next token). Cost per
token is bounded by the window, not the sequence length.
"""
from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens used as left context for the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._num_context = len(self._ids)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def add_tokens(self, new_ids) -> str:
        """Append tokens; returns the newly completed text (possibly empty)."""
        emitted = []
        for tok in new_ids:
            self._ids.append(tok)
            decode = self.tokenizer.decode
            shown = decode(self._ids[self._prefix : self._read], skip_special_tokens=self.skip_special_tokens)
            full = decode(self._ids[self._prefix :], skip_special_tokens=self.skip_special_tokens)
            if len(full) > len(shown) and not full.endswith("\ufffd"):
                emitted.append(full[len(shown):])
                self._prefix, self._read = self._read, len(self._ids)
        delta = "".join(emitted)
        self.text += delta
        return delta
