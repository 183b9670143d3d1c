"""The draft-model proposer in the whole engine on the tiny random Llama (float32, milliseconds a
step), drafted for by a noisy copy of itself, so that drafts are accepted often but not always:
every proposal is the draft model's greedy continuation as transformers computes it (the draft's KV
cache holds what it claims after every roll-back) and the outputs equal plain decoding token for
token, with the draft catching up in chunks of a small token budget, across preemption and
prefix-cache hits. Also: a draft pool too small for some requests proposes nothing for them, a
proposer that raises fails only the request concerned, finished requests' draft state is freed, and
bad configurations fail at start-up with clear errors. test_smollm2_draft_model.py runs a real model
drafting for itself."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from flashserve import LLM
from flashserve.engine.arg_utils import EngineArgs
from flashserve.errors import ModelNotFoundError
from flashserve.spec_decode.draft_model import DraftModelProposer, check_same_tokens
from tests.model.tiny import save_hf
from tests.spec_decode.test_engine_ngram import (  # noqa: F401 (plain: plain_out's fixture)
    GREEDY, assert_no_leak, generate, plain, plain_out, prompts)

BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4  # K and V, layers, block, kv heads, head_dim, float32
NOISE = 0.1  # of each weight tensor's standard deviation


def engine(path, **kw):
    kw = {"dtype": "float32", "kv_cache_dtype": "float32", "block_size": 4, **kw}  # budgets below count fp32 blocks
    # k pinned: a draft as large as its target would never pay off, and adaptive k would stop it drafting.
    return LLM(model=path, speculative_config={"model": path, "num_speculative_tokens": 4, "adaptive": False}, **kw)


def assert_draft_freed(llm):
    """The proposer learns at a step which requests left before it (as the runner does): after one
    more, empty step, the draft's pool holds nothing."""
    llm.engine.step()
    proposer = llm.engine.proposer
    assert proposer.sequences == {}
    kvm = proposer.kv_cache_manager
    kvm.check_invariants([])
    assert kvm.num_free_blocks == kvm.num_blocks - 1


@pytest.fixture(scope="module")
def noisy_draft(tiny_llama, tmp_path_factory, hf_smollm2_tokenizer):
    """The tiny Llama with noise on its weights: a draft that agrees with its target often, not always."""
    draft = copy.deepcopy(tiny_llama[1])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * NOISE)
    d = tmp_path_factory.mktemp("noisy_draft")
    save_hf(draft, d)
    hf_smollm2_tokenizer.save_pretrained(d)
    return str(d), draft


def greedy_continuation(hf, tokens: list[int], k: int) -> list[int]:
    out, past, new = None, None, torch.tensor([tokens])
    drafts = []
    with torch.no_grad():
        for _ in range(k):
            out = hf(new, cache=past, use_cache=True)
            past = out.cache
            drafts.append(int(out.logits[0, -1].argmax()))
            new = torch.tensor([drafts[-1:]])
    return drafts


@pytest.mark.parametrize("kw,rounds", [
    (dict(), 1),
    (dict(max_num_batched_tokens=24), 1),  # catch-up in chunks
    (dict(kv_cache_memory=40 * BLOCK_BYTES), 2),  # preemption, a short draft pool, prefix-cache hits
])
def test_drafts_are_the_draft_models_greedy_continuation(tiny_llama, noisy_draft, plain_out, kw, rounds):
    """Every proposal equals transformers' greedy continuation of the request's tokens by the draft
    model (or its start, when the draft's pool ran short): the draft's KV cache, rolled back after
    each verification, holds exactly the tokens it claims. Outputs equal plain decoding."""
    llm = LLM(model=tiny_llama[0], dtype="float32", kv_cache_dtype="float32", block_size=4,
              speculative_config={"model": noisy_draft[0], "num_speculative_tokens": 4, "adaptive": False}, **kw)
    proposer = llm.engine.proposer
    propose, calls = proposer.propose, []

    def recording(requests, num_drafts):
        drafts = propose(requests, num_drafts)
        calls.extend((list(r.all_token_ids), drafts.get(r.request_id, [])) for r in requests)
        return drafts

    proposer.propose = recording
    for _ in range(rounds):
        assert [o.outputs[0].token_ids for o in generate(llm, prompts(), GREEDY)] == plain_out
    assert sum(1 for _, d in calls if d) > len(calls) // 2
    wrong = [i for i, (tokens, d) in enumerate(calls) if d != greedy_continuation(noisy_draft[1], tokens, 4)[:len(d)]]
    assert wrong == []
    stats = llm.engine.get_stats()
    print(f"\n{kw}: accepted {stats.spec_accepted_tokens_total} of {stats.spec_draft_tokens_total} drafts")
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total  # rejections roll back
    assert ("kv_cache_memory" in kw) == (stats.num_preemptions_total > 0)
    assert_no_leak(llm)
    assert_draft_freed(llm)


def test_the_drafts_catch_up_runs_as_decode_rows(tiny_llama, noisy_draft, plain_out):
    """After a verification the draft computes what it has not seen: the target's token, and before it
    the last draft when every draft was accepted. Those few rows run through the decode plan (a
    prompt chunk's attention costs more per step); whole prompts still take the modules."""
    llm = LLM(model=tiny_llama[0], dtype="float32", kv_cache_dtype="float32", block_size=4,
              speculative_config={"model": noisy_draft[0], "num_speculative_tokens": 4, "adaptive": False})
    runner = llm.engine.proposer.runner
    assert runner.decode_plan is not None
    forward, steps = runner._forward, []

    def recording(input_ids, positions, meta, only_decodes):
        steps.append((max(meta.query_lens_cpu), runner.decode_plan.applies(meta, len(input_ids), only_decodes)))
        return forward(input_ids, positions, meta, only_decodes)

    runner._forward = recording
    assert [o.outputs[0].token_ids for o in generate(llm, prompts(), GREEDY)] == plain_out
    assert any(rows >= 2 and planned for rows, planned in steps)  # catch-ups of two tokens or more, as decode rows
    long_ones = [planned for rows, planned in steps if rows > 5]  # prompts longer than k + 1
    assert long_ones and not any(long_ones)


def test_a_full_draft_pool_proposes_nothing_instead_of_failing(tiny_llama, plain_out):
    """A draft pool of 7 usable blocks (28 tokens): the 60-token prompt never gets a draft, short
    prompts do while they fit; outputs stay those of plain decoding."""
    llm = engine(tiny_llama[0])
    eng = llm.engine
    eng.proposer = DraftModelProposer(eng.config, 8, eng.device, eng.tokenizer)
    outs = generate(llm, prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == plain_out
    longest = max(range(len(outs)), key=lambda i: len(outs[i].prompt_token_ids))
    assert len(outs[longest].prompt_token_ids) > 28
    assert outs[longest].metrics["spec_draft_tokens"] == 0
    assert eng.get_stats().spec_accepted_tokens_total > 0
    assert_no_leak(llm)
    assert_draft_freed(llm)


def test_a_proposer_error_fails_only_its_request(tiny_llama, plain_out):
    """The draft raises whenever request "2" is in its batch: that request ends with finish reason
    "error" after its first token; the others are retried without it and finish as plain decoding,
    drafting as well as ever. The draft's pool starts as NaN, so that a retry reading K/V the failed
    pass never wrote (blocks it had registered for prefix hits) gets drafts nothing accepts: this
    test failed now and then, with whatever the uninitialized pool held, until the failed pass's
    blocks were forgotten."""
    llm = engine(tiny_llama[0])
    runner = llm.engine.proposer.runner
    for k, v in runner.kv_caches:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    execute = runner.execute

    def failing(self, sched):
        if any(r.request_id == "2" for r in sched.scheduled):
            raise RuntimeError("injected draft failure")
        return execute(sched)

    runner.execute = types.MethodType(failing, runner)
    outs = generate(llm, prompts(), GREEDY)
    assert outs[2].request_id == "2"
    assert outs[2].outputs[0].finish_reason == "error"
    assert list(outs[2].outputs[0].token_ids) == list(plain_out[2][:1])
    others = [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 2]
    assert others == [t for i, t in enumerate(plain_out) if i != 2]
    # The draft is the target itself: all but near-ties of its drafts are accepted.
    for o in outs[:2] + outs[3:]:
        assert o.metrics["spec_accepted_tokens"] >= 0.9 * o.metrics["spec_draft_tokens"] > 0
    assert_no_leak(llm)
    assert_draft_freed(llm)


def test_the_vocabulary_must_match(smollm2_gguf, gemma3_gguf):
    with pytest.raises(ValueError, match=r"draft model .*gemma.* has a vocabulary of 262144 tokens but the target "
                                         r".*SmolLM2.* has 49152"):
        LLM(model=smollm2_gguf, speculative_config={"model": gemma3_gguf})


def test_the_tokenizers_must_match():
    """Same size, one token moved: the token maps differ (error names both models)."""
    def tok(vocab):
        return types.SimpleNamespace(backend=types.SimpleNamespace(get_vocab=lambda with_added_tokens: vocab))

    check_same_tokens("target", tok({"a": 0, "b": 1}), "draft", tok({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="draft model draft and the target target have different tokenizers"):
        check_same_tokens("target", tok({"a": 0, "b": 1}), "draft", tok({"a": 1, "b": 0}))


@pytest.mark.parametrize("spec,error,match", [
    (dict(speculative_config={"model": "/no/such/draft.gguf"}), ModelNotFoundError, "draft model: .*not found"),
    (dict(speculative_config={"method": "draft_model"}), ValueError, "needs a draft model"),
    (dict(speculative_method="draft_model"), ValueError, "needs a draft model"),
    (dict(speculative_config={"model": "TINY", "num_speculative_tokens": 0}), ValueError, "num_speculative_tokens"),
    (dict(speculative_config={"method": "lookahead"}), ValueError, "unknown speculative method"),
    (dict(speculative_config={"method": "ngram", "model": "TINY"}), ValueError, "a draft model is for method"),
    (dict(speculative_config={"method": "ngram", "k": 3}), ValueError, r"unknown speculative_config keys \['k'\]"),
    (dict(speculative_config={"method": "ngram"}, speculative_method="ngram"), ValueError, "not both"),
])
def test_bad_configuration_fails_at_start_up(tiny_llama, spec, error, match):
    if "speculative_config" in spec and spec["speculative_config"].get("model") == "TINY":
        spec = {**spec, "speculative_config": {**spec["speculative_config"], "model": tiny_llama[0]}}
    with pytest.raises(error, match=match):
        EngineArgs(model=tiny_llama[0], **spec).create_engine_config()


def test_both_spellings_give_the_same_config(tiny_llama):
    path = tiny_llama[0]
    flat = EngineArgs(model=path, speculative_method="draft_model", speculative_model=path,
                      num_speculative_tokens=3).create_engine_config().speculative
    nested = EngineArgs(model=path, speculative_config={"model": path, "num_speculative_tokens": 3}
                        ).create_engine_config().speculative
    assert flat == nested
    assert (flat.method, flat.num_speculative_tokens, flat.draft_model_path) == ("draft_model", 3, path)
