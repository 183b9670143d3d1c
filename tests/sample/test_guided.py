"""Guided decoding (structured output) on the real SmolLM2 engine: outputs parse and validate
against their schema, regex or choices, greedy and sampled, with n > 1 and the other sampling
parameters; the masks never leave a row without a token; bad constraints fail up front."""
from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest
import torch

from flashserve.core.sched_output import ScheduledRequest
from flashserve.sample.guided import GuidedDecoding
from flashserve.sample.sampler import Sampler, SamplingMetadata
from flashserve.sampling_params import GuidedDecodingParams, SamplingParams

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "pets"],
    "additionalProperties": False,
}
PROMPT = "Here is a person described as JSON:\n"


def texts(llm, params, prompt=PROMPT) -> list:
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    return out.outputs


def assert_person(c) -> None:
    assert c.finish_reason == "stop", (c.text, c.finish_reason)
    jsonschema_rs.validate(PERSON, json.loads(c.text))


def test_json_schema_greedy(smollm2_llm):
    (c,) = texts(smollm2_llm, SamplingParams(temperature=0, max_tokens=120,
                                             guided_decoding=GuidedDecodingParams(json=PERSON)))
    assert_person(c)
    assert list(json.loads(c.text)) == ["name", "age", "city", "pets"]  # the schema's order


@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_sampled_n2(smollm2_llm, seed):
    params = SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=120,
                            guided_decoding=GuidedDecodingParams(json=json.dumps(PERSON)))
    outs = texts(smollm2_llm, params)
    assert len(outs) == 2
    for c in outs:
        assert_person(c)


def test_json_schema_with_every_sampling_parameter(smollm2_llm):
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                            presence_penalty=0.5, frequency_penalty=0.5, seed=7, n=2, min_tokens=5,
                            logprobs=2, max_tokens=120, guided_decoding=GuidedDecodingParams(json=PERSON))
    for c in texts(smollm2_llm, params):
        assert_person(c)
        # logprobs are the model's own (taken before the grammar mask): finite, top-2 present
        assert all(len(e) >= 2 and all(lp.logprob > float("-inf") for lp in e.values()) for e in c.logprobs)


def test_json_object(smollm2_llm):
    (c,) = texts(smollm2_llm, SamplingParams(temperature=0, max_tokens=100,
                                             guided_decoding=GuidedDecodingParams(json_object=True)))
    assert c.finish_reason == "stop"
    assert isinstance(json.loads(c.text), dict)


@pytest.mark.parametrize("seed", [0, 1])
def test_choice(smollm2_llm, seed):
    choices = ["positive", "negative", "neutral", 'a "quoted" one']
    params = SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=20,
                            guided_decoding=GuidedDecodingParams(choice=choices))
    for c in texts(smollm2_llm, params, "Sentiment of 'I love it':"):
        assert c.text in choices and c.finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex(smollm2_llm, temperature):
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    params = SamplingParams(temperature=temperature, seed=5, n=2, max_tokens=30,
                            guided_decoding=GuidedDecodingParams(regex=pattern))
    for c in texts(smollm2_llm, params, "Call me at "):
        assert re.fullmatch(pattern, c.text), c.text
        assert c.finish_reason == "stop"


def test_gbnf_and_lark_grammars(smollm2_llm):
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    lark = 'start: "The answer is " ("yes" | "no") "."'
    for g in (gbnf, lark):
        for c in texts(smollm2_llm, SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=20,
                                                   guided_decoding=GuidedDecodingParams(grammar=g))):
            assert c.text in ("The answer is yes.", "The answer is no.")


def test_unconstrained_rows_unchanged_beside_guided_ones(smollm2_llm):
    """A batch mixing both: the free row gives what it gives alone (greedy)."""
    free = SamplingParams(temperature=0, max_tokens=12)
    alone = texts(smollm2_llm, free)[0].text
    outs = smollm2_llm.generate([PROMPT, PROMPT], [free, SamplingParams(
        temperature=0, max_tokens=12, guided_decoding=GuidedDecodingParams(regex="[a-z]+"))], use_tqdm=False)
    assert outs[0].outputs[0].text == alone
    assert re.fullmatch("[a-z]+", outs[1].outputs[0].text)


def test_a_grammar_that_admits_everything_leaves_greedy_output_unchanged(smollm2_llm):
    """A regex every text matches masks no token (EOS included): the greedy tokens are those of
    the unconstrained run, through the masking path of the sampler."""
    free = SamplingParams(temperature=0, max_tokens=24)
    (want,) = texts(smollm2_llm, free)
    (got,) = texts(smollm2_llm, SamplingParams(temperature=0, max_tokens=24,
                                               guided_decoding=GuidedDecodingParams(regex="(.|\\n)*")))
    assert got.token_ids == want.token_ids and got.text == want.text


def test_max_tokens_cuts_a_grammar_short(smollm2_llm):
    (c,) = texts(smollm2_llm, SamplingParams(temperature=0, max_tokens=3,
                                             guided_decoding=GuidedDecodingParams(json=PERSON)))
    assert c.finish_reason == "length" and c.text.startswith("{")


def test_masks_never_leave_a_row_empty(smollm2_llm):
    """Along a real trajectory every mask allows a token, EOS exactly where the grammar is
    complete; a matcher fed a token outside its grammar allows only EOS."""
    engine = smollm2_llm.engine
    guided = GuidedDecoding(engine.tokenizer, engine.eos_token_ids)
    vocab = engine.config.model_config.vocab_size
    eos = list(engine.eos_token_ids)
    gd = GuidedDecodingParams(choice=["yes", "no"])
    ids = engine.tokenizer.encode("yes", add_special_tokens=False)
    out: list[int] = []
    req = ScheduledRequest("r", [1], 0, 1, [1], SamplingParams(guided_decoding=gd), out)
    for step in range(len(ids) + 1):
        rows, allowed = guided.masks([req], vocab)
        assert rows == [0] and allowed.shape == (1, vocab) and allowed.any()
        assert bool(allowed[0, eos].any()) == (step == len(ids))
        if step < len(ids):
            assert allowed[0, ids[step]]
            out.append(ids[step])
    bad = ScheduledRequest("bad", [1], 0, 1, [1], SamplingParams(guided_decoding=gd),
                           engine.tokenizer.encode(" maybe", add_special_tokens=False))
    _, allowed = guided.masks([bad], vocab)
    assert allowed[0].nonzero().flatten().tolist() == sorted(eos)
    guided.free(["r", "bad"])
    assert not guided._followers


def test_sampler_applies_mask_per_row_and_grammar_wins_over_min_tokens():
    """Row 1 may only stop (EOS 3) although min_tokens bans EOS: the grammar wins, the row is not
    left empty; row 0 keeps its own distribution; sampled rows never leave their mask."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [4.0, 3.0, 2.0, -1.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, min_tokens=4)]
    allowed = torch.tensor([[False, False, False, True]])
    md = SamplingMetadata.build(params, [[], []], [[], []], [None, None], eos_token_ids=(3,), device="cpu",
                                grammar=([1], allowed))
    assert md.banned is None
    out = Sampler()(logits, md).sampled_token_ids.tolist()
    assert out == [1, 3]
    params = [SamplingParams(temperature=1.0, top_k=2, top_p=0.9, min_p=0.1)] * 2
    allowed = torch.tensor([[True, False, True, False], [False, True, False, True]])
    md = SamplingMetadata.build(params, [[], []], [[], []], [None, None], eos_token_ids=(3,), device="cpu",
                                grammar=([0, 1], allowed))
    for _ in range(50):
        a, b = Sampler()(logits, md).sampled_token_ids.tolist()
        assert allowed[0, a] and allowed[1, b]


@pytest.mark.parametrize("bad, problem", [
    (dict(json="{not json"), "not valid JSON"),
    (dict(json={"type": "objekt"}), "objekt"),
    (dict(json={"type": "object", "properties": {"a": {"$ref": "#/defs/missing"}}}), "missing"),
    (dict(regex="[a-z"), "unclosed character class"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
    (dict(grammar='root ::= "unterminated'), "end of input"),
    (dict(choice=[]), "non-empty list"),
    (dict(), "exactly one"),
    (dict(regex="a", choice=["a"]), "exactly one"),
])
def test_bad_constraints_fail_up_front(bad, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        SamplingParams(guided_decoding=GuidedDecodingParams(**bad))


def test_params_that_cannot_combine_with_a_grammar():
    gd = GuidedDecodingParams(json_object=True)
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, guided_decoding=gd)
    with pytest.raises(ValueError, match="beam_grammar_prefix needs guided_decoding"):
        SamplingParams(temperature=0, max_tokens=1, beam_grammar_prefix=(1, 2))
    SamplingParams(use_beam_search=True, temperature=0, guided_decoding=gd)  # beams follow the grammar
