"""Beam search shares KV blocks between beams through reference counts: round 1 computes the
prompt once, every later request forks the held request of the beam it extends (the partly
filled last block included) and computes only its one new token. Checked while the search
runs (ref counts, tokens computed per step), after it (no leaks), and against transformers'
beam search on the tiny random Llama, also when seats or memory run short and beams fall back
to ordinary requests."""
from __future__ import annotations

import pytest
import torch

from flashserve import LLM
from flashserve.engine.beam_search import BeamSearchParams
from flashserve.model.loader import load_model_config
from flashserve.runner.kv_cache import kv_bytes_per_block

PROMPT = list(range(20, 50))  # 30 tokens: 7 full blocks of 4 and a partial one holding 2
K = 4


def record_steps(eng) -> list[dict]:
    """Wrap the scheduler: per step, the running tables and ref counts before scheduling, and
    what was scheduled; the block bookkeeping is checked after every step."""
    s, log = eng.scheduler, []
    schedule = s.schedule

    def recorded():
        s.check_invariants()
        entry = {"tables": [list(r.block_ids) for r in s.running], "held": set(s.held),
                 "refs": [b.ref_cnt for b in s.kv_cache_manager.pool.blocks]}
        out = schedule()
        entry["scheduled"] = [(r.num_computed_tokens, r.num_scheduled_tokens) for r in out.scheduled]
        entry["copies"] = out.blocks_to_copy
        log.append(entry)
        return out

    s.schedule = recorded
    return log


def assert_no_leak(eng, free_before: int) -> None:
    kvm = eng.scheduler.kv_cache_manager
    assert not eng.scheduler.held and not eng.has_unfinished_requests()
    kvm.check_invariants([])
    assert kvm.num_free_blocks == free_before
    assert all(b.ref_cnt == 0 for b in kvm.pool.blocks)


def test_beams_fork_the_prompt_and_compute_one_token_per_round(tiny_llama):
    llm = LLM(model=tiny_llama[0], dtype="float32", block_size=4)
    eng = llm.engine
    free_before = eng.scheduler.kv_cache_manager.num_free_blocks
    log = record_steps(eng)
    (out,) = llm.beam_search([PROMPT], BeamSearchParams(K, 8, 1.0, "never"))
    assert len(out.sequences) == K

    first, second, *rest = log
    assert first["scheduled"] == [(0, 30)]  # round 1: the prompt, once
    assert len(second["tables"]) == K  # round 2's beams start running at once: they forked it
    prompt_blocks = second["tables"][0]
    assert len(prompt_blocks) == 8 and second["tables"] == [prompt_blocks] * K
    assert [second["refs"][b] for b in prompt_blocks] == [K] * 8  # partial block 8 included
    assert second["scheduled"] == [(30, 1)] * K
    # the first three writers copy the shared partial block; the last is alone on it
    assert [src for src, _ in second["copies"]] == [prompt_blocks[-1]] * (K - 1)
    for done, entry in enumerate(rest, start=1):  # rounds 3..8: one token per beam, nothing more
        assert entry["scheduled"] == [(30 + done, 1)] * K
        assert not entry["held"]  # the previous round was released once this round had forked it
        assert all(t[:7] == prompt_blocks[:7] for t in entry["tables"])
        for b in {b for t in entry["tables"] for b in t}:
            assert entry["refs"][b] == sum(b in t for t in entry["tables"])
        assert [entry["refs"][b] for b in prompt_blocks[:7]] == [K] * 7
    assert len(rest) == 6
    assert_no_leak(eng, free_before)


def test_finished_steps_hold_their_blocks_until_the_next_round_has_forked_them(tiny_llama):
    llm = LLM(model=tiny_llama[0], dtype="float32", block_size=4)
    eng, seen = llm.engine, []
    step = eng.step

    def stepped():  # each round is one step here; after it, the round's requests are held
        outs = step()
        held = eng.scheduler.held.values()
        seen.append((len(held), len({b for r in held for b in r.block_ids}), eng.get_stats().kv_blocks_used))
        return outs

    eng.step = stepped
    llm.beam_search([PROMPT], BeamSearchParams(K, 4, 1.0, "never"))
    assert [n for n, _, _ in seen] == [1, K, K, K]
    assert seen[0][1] == 8  # the prompt's blocks outlive the request that computed them
    assert all(distinct == used for _, distinct, used in seen)  # nothing else holds blocks


CONFIGS = {
    "shared": dict(),
    "two seats": dict(max_num_seqs=2),  # beams without a seat run as ordinary requests
    "two seats, no prefix cache": dict(max_num_seqs=2, enable_prefix_caching=False),
    "short of memory": dict(kv_blocks=12),  # forked beams get preempted and recomputed
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("k,lp,early,max_tokens", [(K, 1.0, False, 8), (3, 0.7, True, 10)])
def test_beam_search_equals_transformers_on_the_tiny_model(tiny_llama, config, k, lp, early, max_tokens):
    path, hf = tiny_llama
    config = dict(config)
    if "kv_blocks" in config:
        per_block = kv_bytes_per_block(load_model_config(path), 4, torch.float32)
        config["kv_cache_memory"] = per_block * config.pop("kv_blocks")
    llm = LLM(model=path, dtype="float32", block_size=4, **config)
    free_before = llm.engine.scheduler.kv_cache_manager.num_free_blocks
    (ours,) = llm.beam_search([PROMPT], BeamSearchParams(k, max_tokens, lp, early))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), num_beams=k, num_return_sequences=k, length_penalty=lp,
                          early_stopping=early, max_new_tokens=max_tokens, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, eos_token_id=2, pad_token_id=2)
    for i in range(k):
        assert ours.sequences[i].tokens == ref.sequences[i, len(PROMPT):].tolist(), i
        assert abs(ours.sequences[i].score - ref.sequences_scores[i].item()) < 1e-4, i
    if "kv_cache_memory" in config:
        assert llm.engine.get_stats().num_preemptions_total > 0
    assert_no_leak(llm.engine, free_before)


def test_an_error_mid_search_releases_every_block(tiny_llama):
    llm = LLM(model=tiny_llama[0], dtype="float32", block_size=4)
    eng = llm.engine
    free_before = eng.scheduler.kv_cache_manager.num_free_blocks
    step, calls = eng.step, []

    def failing():
        calls.append(1)
        if len(calls) == 3:  # round 3 is queued on round 2's held blocks
            raise RuntimeError("boom")
        return step()

    eng.step = failing
    with pytest.raises(RuntimeError, match="boom"):
        llm.beam_search([PROMPT], BeamSearchParams(K, 8))
    assert_no_leak(eng, free_before)


def test_generate_with_use_beam_search_equals_transformers(tiny_llama):
    """SamplingParams(use_beam_search=True) through LLM.generate, beside a greedy prompt."""
    from flashserve import SamplingParams

    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", block_size=4)
    beam = SamplingParams(use_beam_search=True, n=3, temperature=0.0, max_tokens=6, length_penalty=0.8,
                          early_stopping=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ours, plain = llm.generate([PROMPT, PROMPT], [beam, greedy], use_tqdm=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), num_beams=3, num_return_sequences=3, length_penalty=0.8,
                          early_stopping=True, max_new_tokens=6, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, eos_token_id=2, pad_token_id=2)
        ref_greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                 pad_token_id=2)
    assert [list(o.token_ids) for o in ours.outputs] == [ref.sequences[i, len(PROMPT):].tolist() for i in range(3)]
    assert list(plain.outputs[0].token_ids) == ref_greedy[0, len(PROMPT):].tolist()
