"""Prompt lookup drafts against a plain-Python reading of the rule: the continuation of the most
recent earlier occurrence of the last n tokens, n from max down to min."""
from __future__ import annotations

import random

from flashserve.spec_decode.ngram import ngram_draft


def reference(tokens, k, n_min, n_max):
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


def test_examples():
    assert ngram_draft([1, 2, 3, 4, 9, 9, 1, 2, 3], 3, 1, 3) == [4, 9, 9]
    assert ngram_draft([1, 2, 3, 4, 9, 9, 1, 2, 3], 9, 1, 3) == [4, 9, 9, 1, 2, 3]  # up to the end
    # The longest n wins over a more recent shorter match.
    assert ngram_draft([7, 3, 5, 0, 3, 6, 7, 3], 2, 1, 2) == [5, 0]
    # The most recent of several matches of the same n.
    assert ngram_draft([3, 1, 3, 2, 3], 1, 1, 1) == [2]
    assert ngram_draft([1, 2, 3], 4, 1, 3) == []  # no earlier match
    assert ngram_draft([5], 4, 1, 3) == []
    assert ngram_draft([5, 5, 5, 5], 3, 2, 2) == [5]  # the match may run into the suffix itself


def test_random_sequences_match_the_reference():
    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 30))]
        k, n_min = rng.randint(1, 5), rng.randint(1, 3)
        n_max = rng.randint(n_min, 5)
        assert ngram_draft(tokens, k, n_min, n_max) == reference(tokens, k, n_min, n_max), tokens
