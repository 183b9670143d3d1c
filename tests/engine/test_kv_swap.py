"""KV swap preemption on SmolLM2-135M: with a KV pool small enough to preempt, swapping the victims'
blocks to host memory and back gives the same tokens as recomputing them (greedy and seeded
sampling; float16 and int8 KV caches), also when the swap space is too small for some victims; and
afterwards every block and every swap slot is free again.

Packed weights on float activations ("weight-only", float32): a row's result does not depend on
the rest of its step (tests/engine/test_batching.py), so the two modes must agree token for token."""
from __future__ import annotations

import random

import pytest

from flashserve import LLM, SamplingParams

pytestmark = pytest.mark.slow  # five engines on a real model, ~30 s together

BLOCK = 16
F16_BLOCK_BYTES = 2 * 30 * BLOCK * 3 * 64 * 2  # SmolLM2: K and V, layers, tokens, KV heads, head_dim, float16


def _prompts(n=8, seed=3):
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(rng.randint(20, 150))] for _ in range(n)]


PROMPTS = _prompts()
# Half greedy, half sampled with a seed of their own (the generator follows the request across preemption).
PARAMS = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True) if i % 2 else
          SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=24, ignore_eos=True)
          for i in range(len(PROMPTS))]


def _run(gguf, kv_cache_dtype="auto", blocks=30, **kwargs):
    block_bytes = F16_BLOCK_BYTES if kv_cache_dtype == "auto" else 2 * 30 * BLOCK * 3 * (64 + 4)
    llm = LLM(model=gguf, dtype="float32", quantization="weight-only", kv_cache_dtype=kv_cache_dtype,
              max_num_seqs=8, max_num_batched_tokens=256, kv_cache_memory=blocks * block_bytes, **kwargs)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    engine = llm.engine
    stats = engine.get_stats()
    # Nothing held afterwards: every block back in the pool, every swap slot free.
    assert stats.kv_blocks_used == 0 and stats.swap_slots_used == 0
    assert engine.scheduler.kv_cache_manager.num_free_blocks == engine.num_blocks - 1
    assert engine.scheduler.swap.num_free == engine.scheduler.swap.num_slots
    engine.scheduler.check_invariants()
    return [o.outputs[0].token_ids for o in outs], stats


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_swap_and_recompute_give_the_same_tokens(smollm2_gguf, kv_cache_dtype):
    ref, re_stats = _run(smollm2_gguf, kv_cache_dtype, preemption_mode="recompute")
    got, stats = _run(smollm2_gguf, kv_cache_dtype, preemption_mode="swap", swap_space=64 * F16_BLOCK_BYTES)
    assert re_stats.num_preemptions_total > 0 and re_stats.num_swapped_out_total == 0
    assert stats.num_preemptions_total > 0 and stats.num_swapped_out_total == stats.num_preemptions_total
    assert got == ref


def test_too_small_a_swap_space_falls_back_to_recompute(smollm2_gguf):
    ref, _ = _run(smollm2_gguf, preemption_mode="recompute")
    got, stats = _run(smollm2_gguf, preemption_mode="swap", swap_space=6 * F16_BLOCK_BYTES)
    assert stats.swap_slots_total == 6
    assert 0 < stats.num_swapped_out_total < stats.num_preemptions_total  # some victims did not fit
    assert got == ref
