"""Layer streaming (max_weight_memory): with a window of a few decoder layers, or one, the model
gives the unconstrained engine's greedy tokens; a budget below one layer is refused with the sizes;
and on Qwen2.5-Coder-1.5B the process's resident memory, read from the OS, stays within the budget
plus the KV cache plus a stated overhead."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashserve import LLM, SamplingParams

PROMPTS = ["def fibonacci(n):", "The capital of France is"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
MiB = 2**20


def _engine(gguf, budget=None):
    return LLM(model=gguf, max_weight_memory=budget, max_model_len=256, max_num_seqs=4, kv_cache_memory=8 * MiB)


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_streamed_windows_give_the_resident_models_tokens(smollm2_gguf):
    from flashserve.offload.layer_streaming import resident_bytes
    from flashserve.offload.packed_layers import streamed_params

    ref = _tokens(_engine(smollm2_gguf))
    probe = _engine(smollm2_gguf, budget=1 << 40).engine.runner.model  # a budget for all: nothing streams
    assert probe.layer_streamer is None
    resident = resident_bytes(probe)
    # A layer's bytes in the file: its tensors, each 64-aligned.
    layer = max(sum(p.nbytes + 64 for _, p in streamed_params(x)) for x in probe.model.layers)
    for window in (1, 2, 4):  # a ring of one buffer, of two, and two layers pinned beside a ring of two
        llm = _engine(smollm2_gguf, budget=resident + window * layer)
        streamer = llm.engine.runner.model.layer_streamer
        assert streamer is not None and streamer.window == window
        assert _tokens(llm) == ref
        assert _tokens(llm) == ref  # a second pass over the ring, from wherever it stopped


def test_a_budget_below_one_layer_is_refused(smollm2_gguf):
    with pytest.raises(ValueError, match=r"max_weight_memory=1000000 bytes .* plus one decoder layer"):
        _engine(smollm2_gguf, budget=1_000_000)
    with pytest.raises(ValueError, match="max_weight_memory must be a positive"):
        _engine(smollm2_gguf, budget=0)


# One engine per process, so that the process's peak resident set is this engine's alone.
_CHILD = r"""
import json, sys
from flashserve import LLM, SamplingParams
from flashserve.offload.layer_streaming import resident_bytes
budget = None if sys.argv[2] == "none" else int(sys.argv[2])
llm = LLM(model=sys.argv[1], max_weight_memory=budget, max_model_len=256, max_num_seqs=4, kv_cache_memory=32 << 20)
outs = llm.generate(%r, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
model = llm.engine.runner.model
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "tokens": [o.outputs[0].token_ids for o in outs],
    "peak": int(status["VmHWM"].split()[0]) * 1024, "rss": int(status["VmRSS"].split()[0]) * 1024,
    "kv": llm.engine.num_blocks * llm.engine.kv_block_bytes, "resident": resident_bytes(model),
    "largest_resident": max(p.nbytes for p in model.parameters()),
    "window": getattr(getattr(model, "layer_streamer", None), "window", None)}))
""" % (PROMPTS,)

# What the process holds besides weights and KV: Python, torch, the tokenizer (~240 MiB after the
# imports, measured), 160 MiB of slack for allocator and metadata.
RUNTIME_OVERHEAD = 400 * MiB


def _child(gguf, budget):
    out = subprocess.run([sys.executable, "-c", _CHILD, gguf, str(budget)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two Qwen2.5-Coder-1.5B processes (~40 s; the first streamed run also writes the packed layers)
def test_qwen15_streams_within_its_budget_and_keeps_its_tokens(qwen15_gguf):
    budget = 620 * MiB  # the embedding and LM head (517 MiB resident, 8-bit) and 3 of 28 layers (~33 MiB each)
    streamed = _child(qwen15_gguf, budget)
    full = _child(qwen15_gguf, "none")
    assert streamed["window"] is not None and streamed["window"] >= 1
    assert streamed["tokens"] == full["tokens"]
    bound = budget + streamed["kv"] + RUNTIME_OVERHEAD
    assert streamed["rss"] <= bound, (streamed, bound)
    # Loading packs the resident embedding and LM head; while a table packs, its file pages, its
    # packed chunks and their concatenation are resident together (measured: the peak passed the
    # steady bound by 1.08x the largest table): allow twice the largest.
    assert streamed["peak"] <= bound + 2 * streamed["largest_resident"], (streamed, bound)
    assert streamed["rss"] < full["rss"] - 400 * MiB  # the 25 layers left on disk (~700 MiB) are not resident
