"""Sampling through the whole engine: seeds independent of the batch, n samples sharing the
prompt's KV blocks (forked, see test_fork.py), stop strings cut across token boundaries."""
from __future__ import annotations

import pytest

from flashserve import SamplingParams
from flashserve.core.request import RequestStatus

pytestmark = pytest.mark.slow


def test_seeded_request_is_the_same_alone_and_in_a_batch_of_16(smollm2_llm):
    llm = smollm2_llm
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(["A recipe for bread:"], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, top_k=40, max_tokens=8 + i, seed=None if i % 2 else i)
              for i in range(16)]
    prompts = [f"Other prompt {i}: " + "word " * i for i in range(16)]
    outs = llm.generate(prompts[:8] + ["A recipe for bread:"] + prompts[8:], others[:8] + [p] + others[8:],
                        use_tqdm=False)
    assert outs[8].outputs[0].token_ids == alone


def test_n_samples_store_the_prompt_blocks_once(smollm2_llm):
    llm = smollm2_llm
    eng = llm.engine
    prompt = "The history of the printing press " * 12  # several full blocks
    eng.add_request("shared", prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True))
    eng.step()  # sample 0 computes the prompt, the other three fork its blocks
    kvm = eng.scheduler.kv_cache_manager
    tables = [kvm.block_ids(f"shared#{i}") for i in range(4)]
    n_prompt = len(eng.output_processor.states["shared"].prompt_token_ids)
    assert n_prompt % kvm.block_size and len(tables[0]) == -(-n_prompt // kvm.block_size) >= 5
    assert all(t == tables[0] for t in tables)  # the partly filled last block included
    assert all(kvm.pool.blocks[b].ref_cnt == 4 for b in tables[0])
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert len(outs[-1].outputs) == 4 and all(len(c.token_ids) == 6 for c in outs[-1].outputs)
    kvm.check_invariants([])


def test_stop_string_across_tokens_is_found_and_cut(smollm2_llm):
    llm = smollm2_llm
    base = SamplingParams(temperature=0, max_tokens=40)
    full = llm.generate(["Write the numbers from one to twenty in words:"], base, use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    # choose a stop string that starts inside one token and ends inside a later one
    pieces = [tok.decode([t]) for t in full.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = full.text[start : start + 4]
    assert len(stop) == 4
    cut = llm.generate(["Write the numbers from one to twenty in words:"],
                       SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop


def test_abort_mid_generation_frees_blocks(smollm2_llm):
    eng = smollm2_llm.engine
    eng.add_request("a", "Tell me about", SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", "Tell me about cats", SamplingParams(temperature=0, max_tokens=5))
    for _ in range(3):
        eng.step()
    eng.abort_request("a")
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == ["b"] and len(done[0].outputs[0].token_ids) == 5
    kvm = eng.scheduler.kv_cache_manager
    kvm.check_invariants([])
    assert all(b.ref_cnt == 0 for b in kvm.pool.blocks)
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
