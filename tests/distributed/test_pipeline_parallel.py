"""Pipeline parallelism (distributed/pipeline_parallel.py): two stages of layers in two processes
compute exactly what one process computes (the same ops on the same inputs, one stage after the
other), and layouts it cannot run are refused at start-up."""
from __future__ import annotations

import pytest

from flashserve import LLM, SamplingParams
from flashserve.distributed.pipeline_parallel import balanced_stages
from flashserve.engine.arg_utils import EngineArgs
from tests.distributed.test_tensor_parallel import assert_logprobs_close, run
from tests.model.tiny import hf_tiny, write_gguf


def test_stages_balance_the_bytes_of_their_layers():
    assert balanced_stages([1.0] * 30, 2) == [(0, 15), (15, 30)]
    assert balanced_stages([1.0] * 5, 2) in ([(0, 3), (3, 5)], [(0, 2), (2, 5)])
    assert balanced_stages([5.0, 1.0, 1.0, 1.0, 1.0], 2) == [(0, 1), (1, 5)]
    assert balanced_stages([1.0, 1.0, 1.0, 1.0, 1.0, 6.0], 2) == [(0, 5), (5, 6)]  # 5 | 6
    three = balanced_stages([2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0], 3)  # 3 | 4 | 3 is the least largest stage
    assert three[0][0] == 0 and three[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(three, three[1:]))
    assert max(sum([2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0][a:b]) for a, b in three) == 4.0
    with pytest.raises(ValueError, match="at least one layer"):
        balanced_stages([1.0, 1.0], 3)


def test_refused_layouts(tmp_path, tiny_llama):
    gemma = str(write_gguf(hf_tiny("gemma3"), tmp_path / "gemma.gguf"))
    with pytest.raises(ValueError, match="needs a llama or qwen2 model of at least 2 layers; this is gemma3"):
        EngineArgs(model=gemma, pipeline_parallel_size=2).create_engine_config()
    with pytest.raises(ValueError, match="cannot both exceed 1"):
        EngineArgs(model=tiny_llama[0], pipeline_parallel_size=2, tensor_parallel_size=2).create_engine_config()


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from flashserve.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_model_path(smollm2_gguf)


@pytest.mark.parametrize("arch,qtype", [("llama", "F32"), ("qwen2", "Q8_0")])
def test_two_stages_give_one_process_tokens_and_logprobs(tmp_path, tokenizer, arch, qtype):
    """One step in flight: the same batches as one process, so the same sums, bit for bit. Two
    micro-batches (the default): other batches, so other summation orders in the matrix products."""
    path = str(write_gguf(hf_tiny(arch), tmp_path / f"{arch}.gguf", qtype=qtype))
    one = run(path, tokenizer)
    serial = run(path, tokenizer, pipeline_parallel_size=2, pipeline_micro_batches=1)
    assert [o.token_ids for o in serial] == [o.token_ids for o in one]
    for a, b in zip(one, serial):
        for la, lb in zip(a.logprobs, b.logprobs):
            assert {t: lp.logprob for t, lp in la.items()} == {t: lp.logprob for t, lp in lb.items()}
    overlapped = run(path, tokenizer, pipeline_parallel_size=2)
    assert [o.token_ids for o in overlapped] == [o.token_ids for o in one]
    assert_logprobs_close(one, overlapped, 1e-4)


def test_micro_batches_overlap_with_preemption_and_prefix_caching(tmp_path, tokenizer):
    """Ten requests sharing prefixes in a KV cache too small for all: two micro-batches in flight
    (both non-empty at once), preemptions, prefix-cache hits, and one process's greedy tokens."""
    path = str(write_gguf(hf_tiny("llama"), tmp_path / "llama.gguf", qtype="Q8_0"))
    shared = [3 + i for i in range(20)]
    prompts = [shared[: 8 + i] + [100 + 7 * i, 50 + i] for i in range(10)]
    small = dict(kv_cache_memory=40 * 2048, enable_prefix_caching=True, max_num_seqs=10, block_size=4)  # 40 blocks
    one = run(path, tokenizer, prompts, max_tokens=16, **small)
    both_busy, stats = [], []

    def watch(engine, outputs):  # tokens from the step just collected, requests in the one still in flight
        both_busy.append(bool(outputs) and any(s.scheduled for s in engine._in_flight))
        stats.append(engine.get_stats())

    two = run(path, tokenizer, prompts, max_tokens=16, pipeline_parallel_size=2, on_step=watch, **small)
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert sum(both_busy) > 10
    assert stats[-1].num_preemptions_total > 0 and stats[-1].prefix_cache_hits > 0


@pytest.mark.slow
def test_smollm2_default_engine_two_stages(smollm2_gguf, smollm2_default_llm):
    """The default engine (4-bit codes, int8 activations): each stage runs its layers as one process
    would, so the greedy tokens are one process's, with no near-tie exception."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "List three primary colors:\n1."]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    one = smollm2_default_llm.generate(prompts, params, use_tqdm=False)
    llm = LLM(model=smollm2_gguf, max_model_len=1024, enable_prefix_caching=False, pipeline_parallel_size=2)
    try:
        two = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
