"""Structured output at sampling time: one llguidance matcher per constrained request, and the
allowed-token masks the sampler applies.

Owned by the model runner: per-request state keyed by request id (like the seeded generators),
dropped when the scheduler reports the request finished or aborted; the scheduler never sees a
matcher. A matcher follows its request's output tokens lazily: before each mask it consumes the
tokens appended since the previous one, so a preempted (recomputed) request or a forked sample
needs no special case; a beam search step first reads its beam's tokens (beam_grammar_prefix).
Compiled grammars are cached per grammar text and each request gets a copy; the engine compiles
at admission, so a grammar that does not fit the vocabulary is an error before the request is
queued and the step finds it compiled.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import llguidance

logger = logging.getLogger(__name__)

MAX_COMPILED = 64  # compiled grammars kept, least recently used dropped first


@dataclass
class _Follower:
    matcher: llguidance.LLMatcher
    consumed: int = 0  # output tokens fed to the matcher so far


class GuidedDecoding:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._vocab: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar text → unused matcher
        # Admission compiles on the server's event loop while a step runs in a worker thread.
        self._lock = threading.Lock()
        self._followers: dict[str, _Follower] = {}

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        # Built at the first constrained request, not at start-up: it took 0.5-0.9 s for SmolLM2's
        # 49k tokens and 5-10 s for Gemma 3's 262k (measured), which an unconstrained server never needs.
        if self._vocab is None:
            import llguidance

            self._vocab = llguidance.LLTokenizer(self._tokenizer.backend.to_str(),
                                                 n_vocab=self._tokenizer.vocab_size, eos_token=self._eos)
        return self._vocab

    def compile(self, gd) -> llguidance.LLMatcher:
        """A fresh matcher for GuidedDecodingParams `gd`; ValueError when its grammar does not
        compile against this vocabulary."""
        import llguidance  # with the first constrained request: start-up does not pay for it

        from flashserve.sample.grammar import grammar_text

        text = grammar_text(gd)
        with self._lock:
            template = self._compiled.get(text)
            if template is None:
                template = llguidance.LLMatcher(self._ll_tokenizer(), text, log_level=0)
                if template.is_error():
                    raise ValueError(f"invalid guided decoding grammar: {template.get_error()}")
                self._compiled[text] = template
                if len(self._compiled) > MAX_COMPILED:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(text)
            return template.deep_copy()

    def free(self, request_ids) -> None:
        for rid in request_ids:
            self._followers.pop(rid, None)

    def masks(self, rows, width: int) -> tuple[list[int], torch.Tensor] | None:
        """rows: the ScheduledRequests sampled this step. Returns the indices of the rows with a
        grammar and their allowed tokens, (k, width) bool, or None when no row has one. Every row
        allows at least one token: a matcher in an error state allows only EOS."""
        guided = [i for i, r in enumerate(rows) if r.sampling_params.guided_decoding is not None]
        if not guided:
            return None
        followers = [self._follow(rows[i]) for i in guided]
        n_vocab = self._vocab.vocab_size
        # (k, words): bit j of word w is token 32w + j
        bits = np.empty((len(guided), (n_vocab + 31) // 32), dtype=np.int32)
        for row, f in zip(bits, followers):
            f.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        allowed = np.zeros((len(guided), width), dtype=np.uint8)  # (k, width); past the tokenizer's: banned
        keep = min(width, n_vocab)
        allowed[:, :keep] = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :keep]
        empty = ~allowed.any(axis=1)
        if empty.any():
            allowed[np.ix_(empty, [t for t in self._eos if t < width])] = 1
        return guided, torch.from_numpy(allowed.view(np.bool_))

    def _follow(self, r) -> _Follower:
        f = self._followers.get(r.request_id)
        if f is None:
            f = self._followers[r.request_id] = _Follower(self.compile(r.sampling_params.guided_decoding))
            prefix = r.sampling_params.beam_grammar_prefix  # a beam's tokens before this step
            if prefix and not f.matcher.consume_tokens(list(prefix)):
                logger.warning("request %s: its beam left the grammar: %s", r.request_id, f.matcher.get_error())
        new = r.output_token_ids[f.consumed:]
        if new and not f.matcher.is_error() and not f.matcher.consume_tokens(new):
            # Cannot happen through our masks; from here the matcher allows only EOS.
            logger.warning("request %s left its grammar: %s", r.request_id, f.matcher.get_error())
        f.consumed += len(new)
        return f
