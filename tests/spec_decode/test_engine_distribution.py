"""temperature > 0 through the whole engine: with prompt lookup, or the model itself as a greedy
draft model, drafting the second token of every request, the joint distribution of the first two
tokens equals the target's, computed analytically from the transformers model the tiny engine was
saved from (temperature 1, top-k 3: 9 cells), by a chi-square test over unseeded requests, with
drafts both accepted and rejected."""
from __future__ import annotations

import random

import torch
import pytest
from scipy.stats import chisquare

from flashserve import LLM, SamplingParams

N = 1500
TOP_K = 3


def top_k_probs(logits):
    vals, ids = logits.topk(TOP_K)
    return dict(zip(ids.tolist(), vals.softmax(-1).tolist()))


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_first_two_tokens_follow_the_target(tiny_llama, method):
    path, hf = tiny_llama
    rng = random.Random(0)
    with torch.no_grad():
        # A prompt that ends with, for each likely first token t, the pair (t, the target's likeliest
        # token after t): prompt lookup then drafts a second token that is often, not always, accepted.
        base = rng.sample(range(256), 200)
        pairs: dict[int, int] = {}
        for _ in range(6):  # adding the pairs changes the distributions a little: iterate to a fixed point
            prompt = base[:-1] + [x for t, f in pairs.items() for x in (t, f)] + base[-1:]
            p1 = top_k_probs(hf(torch.tensor([prompt])).logits[0, -1].float())
            new = {t: hf(torch.tensor([prompt + [t]])).logits[0, -1].argmax().item() for t in p1}
            if new == pairs:
                break
            pairs = new
        joint = {}
        for t1, q1 in p1.items():
            for t2, q2 in top_k_probs(hf(torch.tensor([prompt + [t1]])).logits[0, -1].float()).items():
                joint[(t1, t2)] = q1 * q2
    spec = {"method": method, "num_speculative_tokens": 2, "adaptive": False} | (
        {"model": path} if method == "draft_model" else {})
    llm = LLM(model=path, dtype="float32", block_size=4, max_num_seqs=256, speculative_config=spec)
    params = SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * N, params, use_tqdm=False)
    counts = dict.fromkeys(joint, 0)
    for o in outs:
        counts[tuple(o.outputs[0].token_ids[:2])] += 1  # a pair outside the target's support: KeyError
    stats = llm.engine.get_stats()
    assert stats.spec_draft_tokens_total >= N  # the second token was verified, not plainly sampled
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total  # both paths taken
    print(f"\naccepted {stats.spec_accepted_tokens_total} of {stats.spec_draft_tokens_total} drafts")
    keys = list(joint)
    total = sum(joint.values())  # 1 up to float32 rounding, which scipy's check is stricter than
    result = chisquare([counts[k] for k in keys], [joint[k] / total * N for k in keys])
    assert result.pvalue > 1e-3, (result, counts, joint)
