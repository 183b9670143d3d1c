"""int8 KV cache: attention through it stays close to the float cache, and on the real model
its logits error and greedy agreement are measured and bounded."""
from __future__ import annotations

import random

import pytest
import torch

from flashserve.attention.backend import paged_attention
from flashserve.attention.kv_quant import Int8KVCache
from tests.attention.test_paged_attention import make_batch


def test_quantize_round_trip_error_is_bounded_by_half_a_step():
    cache = Int8KVCache(4, 4, 2, 16, torch.float32, torch.device("cpu"))
    x = torch.randn(10, 2, 16) * torch.tensor([0.01, 30.0]).view(1, 2, 1)
    slots = torch.arange(1 * 4, 1 * 4 + 10)
    cache.write(x, slots)
    back = cache[torch.tensor([1, 2, 3])].reshape(-1, 2, 16)[:10]
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("seed", range(4))
def test_attention_through_int8_cache_is_close_to_the_float_cache(seed):
    rng = random.Random(seed)
    specs = [(rng.randint(0, 30), rng.choice([1, 1, 9])) for _ in range(4)]
    q, k, v, kc, vc, meta, _ = make_batch(rng, specs, 4, 2, 32, 6, torch.float32)
    want = paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 32**-0.5)
    kq = Int8KVCache(*kc.shape, torch.float32, torch.device("cpu"))
    vq = Int8KVCache(*vc.shape, torch.float32, torch.device("cpu"))
    filled = torch.arange(kc.shape[0] * kc.shape[1])
    kq.write(kc.reshape(-1, 2, 32), filled)  # the cached prefix, quantized
    vq.write(vc.reshape(-1, 2, 32), filled)
    got = paged_attention(q, k, v, kq, vq, meta, 32**-0.5)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype,min_agree,max_err", [("int8", 5, 0.1), ("float16", 7, 0.005)])
def test_smaller_kv_cache_on_smollm2_logits_and_greedy_agreement(smollm2_gguf, smollm2_llm, kv_cache_dtype,
                                                                 min_agree, max_err):
    """Reported figures: max logit error over a 200-token prefill + decode, greedy agreement on 8
    prompts, for the int8 and the float16 cache against the float32 one."""
    from flashserve import LLM, SamplingParams

    q8 = LLM(model=smollm2_gguf, dtype="float32", quantization="none", max_model_len=2048,
             kv_cache_dtype=kv_cache_dtype)
    cache = q8.engine.runner.kv_caches[0][0]
    assert getattr(cache, "data", cache).dtype == (torch.int8 if kv_cache_dtype == "int8" else torch.float16)
    prompts = ["The history of Rome", "def merge_sort(xs):", "Water is made of", "My favourite book is",
               "The speed of light", "Once upon a time", "Ingredients for a cake:", "In the beginning"]
    params = SamplingParams(temperature=0, max_tokens=32)
    ref = smollm2_llm.generate(prompts, params, use_tqdm=False)
    got = q8.generate(prompts, params, use_tqdm=False)
    agree = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(ref, got)]
    first_div = []
    for a, b in zip(ref, got):
        x, y = a.outputs[0].token_ids, b.outputs[0].token_ids
        first_div.append(next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x)))
    lp = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    text = "The paged KV cache stores keys and values in fixed-size blocks. " * 8
    r, g = smollm2_llm.generate([text], lp, use_tqdm=False)[0], q8.generate([text], lp, use_tqdm=False)[0]
    rl, gl = r.outputs[0].logprobs[0], g.outputs[0].logprobs[0]
    err = max(abs(rl[t].logprob - gl[t].logprob) for t in rl if t in gl)
    print(f"{kv_cache_dtype} KV: identical greedy 32-token outputs {sum(agree)}/8, first divergence at {first_div}, "
          f"max top-5 logprob error {err:.4f}")
    assert sum(agree) >= min_agree and err < max_err
