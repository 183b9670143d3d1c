"""SamplingParams: how one request picks its tokens and when it stops (vLLM's field names).

Validated once at construction so a bad value is a clear ValueError at the API
boundary, never a failure deep inside a batched step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


@dataclass
class GuidedDecodingParams:
    """Constrains the output (vLLM's shape): exactly one of a JSON schema (dict or its text), a
    regex, a list of choices, a grammar (Lark, or GBNF as llama.cpp takes it) or json_object=True
    (any JSON object). Checked at construction; sample/grammar.py spells it for the library."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        from flashserve.sample.grammar import grammar_text  # the library loads only for a constrained request

        grammar_text(self)


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # -1 (or 0) = off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    # top-N logprobs per prompt token, from the raw logits; the request then skips prefix-cache hits
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Beam search (see engine/beam_search.py): beam width is best_of or n.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # Structured output: the sampler allows only tokens that keep the text inside the grammar.
    guided_decoding: GuidedDecodingParams | None = None
    # Set by beam search on its steps under a grammar, never by a user: the beam's tokens so far,
    # which the grammar reads before this request's output; the step's top-N logprobs are then of
    # tokens the grammar allows (the others -inf).
    beam_grammar_prefix: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.guided_decoding, dict):
            self.guided_decoding = GuidedDecodingParams(**self.guided_decoding)
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            fail(f"n must be an integer >= 1, got {self.n!r}")
        if self.best_of is not None and self.best_of < self.n:
            fail(f"best_of must be >= n, got best_of={self.best_of} and n={self.n}")
        if self.best_of is not None and self.best_of > 1 and self.is_greedy and not self.use_beam_search:
            fail(f"best_of must be 1 when using greedy sampling, got {self.best_of}")  # vLLM's rule
        if self.temperature < 0.0:
            fail(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            fail(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0.0:
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            fail(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            fail(f"logprobs must be >= 0, got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            fail(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop must be a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids must be non-negative")
        if self.use_beam_search:
            if self.temperature > _GREEDY_EPS:
                fail("beam search needs temperature=0")
            if self.length_penalty != 1.0 and self.early_stopping not in (True, False, "never"):
                fail(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        elif self.length_penalty != 1.0:
            fail("length_penalty only applies with use_beam_search=True")
        if self.early_stopping not in (True, False, "never"):
            fail(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.guided_decoding is not None:
            if not isinstance(self.guided_decoding, GuidedDecodingParams):
                fail(f"guided_decoding must be GuidedDecodingParams, got {type(self.guided_decoding).__name__}")
            # A finished grammar allows only EOS: a request that ignores it would never end.
            if self.ignore_eos:
                fail("ignore_eos cannot be combined with guided decoding")
        if self.beam_grammar_prefix is not None and self.guided_decoding is None:
            fail("beam_grammar_prefix needs guided_decoding")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def num_samples(self) -> int:
        """Sequences generated: best_of of them, of which the n with the highest cumulative logprob are returned."""
        return self.best_of or self.n

    @property
    def beam_width(self) -> int:
        return self.best_of or self.n

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
