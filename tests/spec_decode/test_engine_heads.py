"""Medusa heads and the EAGLE layer in the whole engine on the tiny random Llama (float32), both
trained by spec_decode/train.py on the tiny model's own greedy answers (seconds): the hidden rows the
runner hands a proposer are transformers' last hidden states at those positions; greedy outputs equal
plain decoding token for token, alone, batched, with prompt chunks in small budgets, across preemption
and prefix-cache hits; at temperature 1 the joint distribution of the first two tokens (the second
verified against drafts sampled from the heads' own distribution q) passes a chi-square test against
the target's, computed analytically from transformers; bad heads files fail at start-up with errors
naming the mismatch. test_train_heads.py runs the training command end to end."""
from __future__ import annotations

import json
import time

import pytest
import torch
from scipy.stats import chisquare

from flashserve import LLM, SamplingParams
from flashserve.spec_decode.heads import sidecar
from flashserve.spec_decode.train import parse_args, train_heads
from tests.spec_decode.test_engine_distribution import N, TOP_K, top_k_probs
from tests.spec_decode.test_engine_ngram import (  # noqa: F401 (plain: plain_out's fixture)
    GREEDY, assert_no_leak, generate, plain, plain_out, prompts)

BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4  # K and V, layers, block, kv heads, head_dim, float32
K = 3


@pytest.fixture(scope="module")
def heads(tiny_llama, tmp_path_factory):
    """{method: heads file} trained on the tiny model's greedy answers to other prompts than the tests'."""
    path = tiny_llama[0]
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="float32")
    ps = prompts(40, seed=1)
    outs = generate(llm, ps, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    seqs = [p + list(o.outputs[0].token_ids) for p, o in zip(ps, outs)]
    d = tmp_path_factory.mktemp("heads")
    files = {}
    for method in ("medusa", "eagle"):
        files[method] = str(d / f"{method}.safetensors")
        args = parse_args(["--model", path, "--method", method, "--out", files[method], "--num-heads", str(K),
                           "--epochs", "6", "--lr", "3e-3", "--batch-size", "64" if method == "medusa" else "4"])
        train_heads(args, seqs, [len(p) for p in ps], time.perf_counter())
    return files


def engine(path, heads_file, method, **kw):
    kw = {"dtype": "float32", "kv_cache_dtype": "float32", "block_size": 4, **kw}  # budgets below count fp32 blocks
    spec = {"method": method, "model": heads_file, "num_speculative_tokens": K, "adaptive": False}  # k pinned
    return LLM(model=path, speculative_config=spec, **kw)


def test_runner_hands_over_the_targets_hidden_states(tiny_llama, heads):
    """Every row a proposer observes is transformers' last hidden state (after the final norm) of the
    request's token at that position, verification steps included (only the accepted rows come)."""
    path, hf = tiny_llama
    llm = engine(path, heads["medusa"], "medusa")
    proposer, seen = llm.engine.proposer, []
    observe = proposer.observe

    def recording(pairs):
        seen.extend((r.request_id, h.first_position, h.rows.clone()) for r, h in pairs)
        observe(pairs)

    proposer.observe = recording
    outs = generate(llm, prompts()[:4], GREEDY)
    tokens = {o.request_id: list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs}
    assert llm.engine.get_stats().spec_accepted_tokens_total > 0
    with torch.no_grad():
        ref = {rid: hf(torch.tensor([t]), output_hidden_states=True).hidden_states[-1][0] for rid, t in tokens.items()}
    covered = {rid: [] for rid in tokens}
    for rid, first, rows in seen:
        torch.testing.assert_close(rows, ref[rid][first : first + len(rows)], atol=1e-4, rtol=1e-4)
        covered[rid] += range(first, first + len(rows))
    for rid, positions in covered.items():  # each position once, in order (the finishing step's rows are not sent)
        assert positions == list(range(len(positions))) and len(positions) > len(tokens[rid]) - 40


def test_eagle_drafts_are_its_layer_over_the_whole_context(tiny_llama, heads):
    """Adaptive k leaves steps without drafts, and the layer then enters the rows it kept in one call
    when asked again: every draft chain equals the layer run once from position 0 over transformers'
    hidden states and the request's tokens, then fed its own predictions."""
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="float32", block_size=4, enable_prefix_caching=False,
              speculative_config={"method": "eagle", "model": heads["eagle"], "num_speculative_tokens": K})
    proposer = llm.engine.proposer
    propose, calls = proposer.propose, []

    def recording(requests, num_drafts):
        drafts = propose(requests, num_drafts)
        calls.extend((list(r.all_token_ids), drafts[r.request_id]) for r in requests if r.request_id in drafts)
        return drafts

    proposer.propose = recording
    outs = generate(llm, prompts()[:4], GREEDY)
    decoded = sum(len(o.outputs[0].token_ids) for o in outs) - llm.engine.get_stats().spec_accepted_tokens_total
    assert 4 < len(calls) < 0.5 * decoded  # most decode steps went without drafts
    layer, embed = proposer.layer, hf.model.embed_tokens
    with torch.no_grad():
        for tokens, drafts in calls:
            n = len(tokens) - 1
            feats = hf(torch.tensor([tokens[:n]]), output_hidden_states=True).hidden_states[-1]  # (1, n, d)
            out, past = layer(feats, embed(torch.tensor([tokens[1:]])), torch.arange(n))
            want, f = [], out[:, -1:]
            for i in range(len(drafts)):
                want.append(int(hf.lm_head(f)[0, -1].argmax()))
                f, past = layer(f, embed(torch.tensor([want[-1:]])), torch.tensor([n + i]), past)
            assert drafts == want
    assert_no_leak(llm)


@pytest.mark.parametrize("method", ["medusa", "eagle"])
@pytest.mark.parametrize("kw,rounds", [
    (dict(), 1),  # batched, in one step
    (dict(enable_prefix_caching=False, max_num_seqs=1), 1),  # alone
    (dict(max_num_batched_tokens=24), 1),  # drafts share small budgets with prompt chunks
    (dict(kv_cache_memory=40 * BLOCK_BYTES), 2),  # preemption; the second round hits the prefix cache
])
def test_greedy_equals_plain_decoding(tiny_llama, heads, plain_out, method, kw, rounds):
    llm = engine(tiny_llama[0], heads[method], method, **kw)
    for _ in range(rounds):
        got = [o.outputs[0].token_ids for o in generate(llm, prompts(), GREEDY)]
        assert [i for i, (a, b) in enumerate(zip(plain_out, got)) if a != b] == []
    stats = llm.engine.get_stats()
    print(f"\n{method} {kw}: accepted {stats.spec_accepted_tokens_total} of {stats.spec_draft_tokens_total} drafts")
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    assert ("kv_cache_memory" in kw) == (stats.num_preemptions_total > 0)
    assert_no_leak(llm)
    llm.engine.step()  # the proposer learns of the last finished requests at the next step
    assert not llm.engine.proposer.state


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_first_two_tokens_follow_the_target(tiny_llama, heads, method):
    """Temperature 1, top-k 3: the second token is verified against K drafts sampled from the heads'
    q (not one-hot), and the joint distribution of the first two tokens is still the target's."""
    path, hf = tiny_llama
    prompt = prompts()[0]
    with torch.no_grad():
        p1 = top_k_probs(hf(torch.tensor([prompt])).logits[0, -1].float())
        joint = {(t1, t2): q1 * q2 for t1, q1 in p1.items()
                 for t2, q2 in top_k_probs(hf(torch.tensor([prompt + [t1]])).logits[0, -1].float()).items()}
    llm = engine(path, heads[method], method, max_num_seqs=256)
    outs = generate(llm, [prompt] * N, SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=3, ignore_eos=True))
    counts = dict.fromkeys(joint, 0)
    for o in outs:
        counts[tuple(o.outputs[0].token_ids[:2])] += 1  # a pair outside the target's support: KeyError
    stats = llm.engine.get_stats()
    assert stats.spec_draft_tokens_total >= N  # the second token was verified, not plainly sampled
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    print(f"\n{method}: accepted {stats.spec_accepted_tokens_total} of {stats.spec_draft_tokens_total} drafts")
    keys = list(joint)
    total = sum(joint.values())
    result = chisquare([counts[k] for k in keys], [joint[k] / total * N for k in keys])
    assert result.pvalue > 1e-3, (result, counts, joint)


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_seeded_sampling_is_reproducible(tiny_llama, heads, method):
    """A seeded request's drafts come from a generator of its own: the same seed, the same tokens,
    alone or beside other requests. (Without prefix caching: EAGLE's layer sees only the positions the
    target computed, so a prefix-cache hit changes its drafts, hence which of a seed's draws decide.)"""
    llm = engine(tiny_llama[0], heads[method], method, enable_prefix_caching=False)
    p = SamplingParams(temperature=0.8, max_tokens=30, seed=7, ignore_eos=True)
    alone = generate(llm, prompts()[:1], p)[0].outputs[0].token_ids
    batched = generate(llm, prompts()[:6], [p] + [SamplingParams(temperature=0.8, max_tokens=30)] * 5)
    assert batched[0].outputs[0].token_ids == alone


def rewrite_sidecar(heads_file, tmp_path, **changes) -> str:
    """A copy of a heads file whose description says otherwise."""
    out = tmp_path / "bad.safetensors"
    out.write_bytes(open(heads_file, "rb").read())
    meta = json.loads(sidecar(heads_file).read_text()) | changes
    sidecar(out).write_text(json.dumps(meta))
    return str(out)


@pytest.mark.parametrize("changes,method,message", [
    (dict(hidden_size=128), "medusa", "hidden size 128"),
    (dict(vocab_size=49152), "eagle", "vocabulary of 49152 tokens"),
    (dict(), "eagle", "holds medusa heads, not eagle ones"),
    (dict(num_heads=2), "medusa", "has 2 Medusa heads"),
])
def test_mismatched_heads_are_refused(tiny_llama, heads, tmp_path, changes, method, message):
    source = heads["medusa"] if method == "medusa" or not changes else heads["eagle"]
    bad = rewrite_sidecar(source, tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        engine(tiny_llama[0], bad, method)


def test_heads_whose_tensors_do_not_fit_their_description_are_refused(tiny_llama, heads, tmp_path):
    bad = rewrite_sidecar(heads["eagle"], tmp_path, intermediate_size=32)  # the file's MLP has 96
    with pytest.raises(ValueError, match=r"_proj.weight has shape .*, but bad.json implies"):
        engine(tiny_llama[0], bad, "eagle")


def test_missing_heads_file_is_a_clear_error(tiny_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine(tiny_llama[0], str(tmp_path / "none.safetensors"), "medusa")
    with pytest.raises(ValueError, match="needs its heads file"):
        LLM(model=tiny_llama[0], speculative_config={"method": "eagle"})


def test_a_failing_observe_costs_drafts_not_requests(tiny_llama, heads, plain_out):
    """When the proposer cannot take a step's hidden states, its requests lose their drafts for a while
    (their state is dropped and rebuilt from the next rows), and no request fails: outputs equal plain."""
    llm = engine(tiny_llama[0], heads["eagle"], "eagle")
    proposer, calls = llm.engine.proposer, []
    observe = proposer.observe

    def flaky(pairs):
        calls.append(len(pairs))
        if len(calls) % 3 == 2:
            raise RuntimeError("observe failed")
        observe(pairs)

    proposer.observe = flaky
    outs = generate(llm, prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == plain_out
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.get_stats().spec_accepted_tokens_total > 0
