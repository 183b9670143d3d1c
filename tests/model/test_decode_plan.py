"""The C++ decode plan (runner/decode_plan.py) against the Python modules it replaces: the same
kernels in the same order, so hidden states must be bit-identical, step after step, for float
and group-quantized weights (with int8 activations), with q/k/v biases (qwen2), Gemma 3's
sandwich norms, q/k norms, two RoPE bases and sliding windows, several sequences of different
lengths; and it must stand aside wherever it does not apply."""
from __future__ import annotations

import pytest
import torch

from flashserve.core.sched_output import ScheduledRequest
from flashserve.model.loader import load_model
from flashserve.quantization.packed import RowSegments
from flashserve.runner.decode_plan import build_decode_plan
from flashserve.runner.input_batch import build_model_inputs
from flashserve.runner.kv_cache import allocate_kv_caches
from tests.model.tiny import VOCAB, hf_tiny, write_gguf

pytestmark = pytest.mark.usefixtures("cpp_kernels")
BLOCK = 4


def load(arch: str, qtype: str, tmp_path, dtype=torch.float32, quantization: str = "auto", blocks: int = 40,
         kv_cache_dtype: str = "auto"):
    """qtype "A+v:B": type A, with the attention's v projection in type B (a merged q|k|v of two forms)."""
    qtype, _, v_type = qtype.partition("+v:")
    path = str(write_gguf(hf_tiny(arch), tmp_path / f"{arch}-{qtype}-{v_type}.gguf", qtype=qtype,
                          qtype_of={"attn_v": v_type} if v_type else None))
    model, cfg = load_model(path, dtype, quantization=quantization)
    model.bind_kv_caches(allocate_kv_caches(cfg, num_blocks=blocks, block_size=BLOCK, dtype=dtype,
                                            device=torch.device("cpu"), kv_cache_dtype=kv_cache_dtype))
    return model


def step(model, seqs: dict[str, list[int]], done: dict[str, int], tables: dict[str, list[int]], plan=None):
    """One engine step of `seqs` through the plan when given (it must apply), else the modules."""
    reqs = [ScheduledRequest(rid, toks, done[rid], len(toks) - done[rid], tables[rid], None, []) for rid, toks in seqs.items()]
    inputs = build_model_inputs(reqs, BLOCK, torch.device("cpu"))
    with torch.inference_mode():
        if plan is not None:
            assert plan.applies(inputs.attn_metadata, len(inputs.input_ids), only_decodes=False)
            return plan(inputs.input_ids, inputs.positions, inputs.attn_metadata)
        return model(inputs.input_ids, inputs.positions, inputs.attn_metadata)


@pytest.mark.parametrize("arch,qtype,kv_cache_dtype", [
    ("llama", "F32", "float32"), ("llama", "Q4_0", "auto"), ("llama", "Q8_0", "float32"), ("qwen2", "F32", "float32"),
    ("qwen2", "Q4_0", "auto"), ("qwen2", "Q8_0", "float32"), ("llama", "Q4_0", "float16"), ("qwen2", "Q8_0", "bfloat16"),
    ("gemma3", "F32", "float32"), ("gemma3", "Q4_0", "auto"), ("gemma3", "Q8_0", "float16"),
    ("qwen2", "Q4_0+v:Q8_0", "auto"),  # q|k|v as two packed parts (Qwen2.5-Coder-1.5B's Q4_K beside Q6_K)
    ("qwen2", "Q8_0 in tiles", "auto"),  # every 8-bit weight stored in the 16-lane tiles, where the build has them
])
def test_plan_equals_the_modules_bit_for_bit(arch, qtype, kv_cache_dtype, tmp_path):
    qtype, tiles = qtype.removesuffix(" in tiles"), qtype.endswith(" in tiles")
    model = load(arch, qtype, tmp_path, kv_cache_dtype=kv_cache_dtype)
    if tiles:
        from flashserve.kernels import ops
        from flashserve.quantization.group_quant_weight import GroupQuantWeight

        stored = [w.to_wide_tiles() for w in model.modules() if isinstance(w, GroupQuantWeight)]
        assert any(stored) == (ops.wide_tile_lanes() > 0)
    want = {"auto": torch.float16, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    assert model.model.layers[0].self_attn.kv_cache[0].dtype == want[kv_cache_dtype]
    plan = build_decode_plan(model)
    assert plan is not None
    if "+v:" in qtype:
        assert isinstance(model.model.layers[0].self_attn.qkv_proj.qweight, RowSegments)
    if qtype != "F32":
        assert any(getattr(m, "int8_activations", False) for m in model.modules())
    g = torch.Generator().manual_seed(0)
    lens = {"a": 5, "b": 11, "c": 2}
    seqs = {rid: torch.randint(0, VOCAB, (n,), generator=g).tolist() for rid, n in lens.items()}
    tables = {rid: list(range(1 + 12 * i, 13 + 12 * i)) for i, rid in enumerate(seqs)}  # 12 blocks each
    done = dict.fromkeys(seqs, 0)
    step(model, seqs, done, tables)  # prefill: not a decode step, the modules run it
    done = {rid: len(t) for rid, t in seqs.items()}
    for _ in range(6):
        for rid in seqs:  # every sequence takes one more token
            seqs[rid].append(int(torch.randint(0, VOCAB, (1,), generator=g)))
        ref = step(model, seqs, done, tables)
        got = step(model, seqs, done, tables, plan)
        assert torch.equal(got, ref)
        done = {rid: len(t) for rid, t in seqs.items()}



@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("qwen2", "Q8_0"), ("gemma3", "Q4_0")])
def test_verifying_drafts_gives_the_rows_plain_decoding_gives(arch, qtype, tmp_path):
    """A step that scores a token and its drafts (speculative decoding) runs through the plan with a
    decode query per row; each row's hidden state must equal, bit for bit, what a plain one-token
    decode step at that position computes, so that greedy tokens cannot depend on speculation."""
    model = load(arch, qtype, tmp_path)
    plan = build_decode_plan(model)
    g = torch.Generator().manual_seed(1)
    seqs = {rid: torch.randint(0, VOCAB, (n,), generator=g).tolist() for rid, n in {"a": 7, "b": 20}.items()}
    tables = {rid: list(range(1 + 12 * i, 13 + 12 * i)) for i, rid in enumerate(seqs)}
    step(model, seqs, dict.fromkeys(seqs, 0), tables)  # prefill both
    drafts = {rid: torch.randint(0, VOCAB, (k,), generator=g).tolist() for rid, k in {"a": 3, "b": 1}.items()}
    # one step: the last known token plus its drafts, every request at once
    reqs = [ScheduledRequest(rid, toks, len(toks) - 1, 1 + len(drafts[rid]), tables[rid], None, [], drafts[rid])
            for rid, toks in seqs.items()]
    inputs = build_model_inputs(reqs, BLOCK, torch.device("cpu"))
    assert not inputs.attn_metadata.is_pure_decode
    assert plan.applies(inputs.attn_metadata, len(inputs.input_ids), only_decodes=True)
    with torch.inference_mode():
        verified = plan(inputs.input_ids, inputs.positions, inputs.attn_metadata)
    # the same positions one token at a time (the drafts appended as if they had been generated)
    plain = {rid: [] for rid in seqs}
    for j in range(1 + max(len(d) for d in drafts.values())):
        active = {rid: seqs[rid][:-1] + [seqs[rid][-1]] + drafts[rid][:j] for rid in seqs if j <= len(drafts[rid])}
        rows = step(model, active, {rid: len(t) - 1 for rid, t in active.items()}, tables, plan)
        for i, rid in enumerate(active):
            plain[rid].append(rows[i])
    want = torch.stack([row for rid in seqs for row in plain[rid]])
    assert torch.equal(verified, want)

def test_plan_stands_aside_where_it_does_not_apply(tmp_path):
    assert build_decode_plan(load("llama", "Q4_0", tmp_path, dtype=torch.bfloat16)) is None
    assert build_decode_plan(load("gemma3", "F32", tmp_path, kv_cache_dtype="int8")) is None
    assert build_decode_plan(load("llama", "F32", tmp_path, quantization="none")) is not None
    # int8 activations keep every M in the kernels: no row limit. Float activations switch to
    # dequantize + GEMM from large_m rows, and the plan leaves such steps to the modules.
    assert build_decode_plan(load("llama", "Q4_0", tmp_path)).max_rows > 1 << 20
    model = load("llama", "Q4_0", tmp_path, quantization="weight-only")
    plan = build_decode_plan(model)
    assert plan.max_rows == min(m.large_m for m in model.modules() if hasattr(m, "large_m") and hasattr(m, "codes"))
    seqs = {str(i): [1, 2, 3] for i in range(plan.max_rows)}
    tables = {rid: [1 + (i % 30)] for i, rid in enumerate(seqs)}
    inputs = build_model_inputs([ScheduledRequest(r, t, 2, 1, tables[r], None, []) for r, t in seqs.items()],
                                BLOCK, torch.device("cpu"))
    assert inputs.attn_metadata.is_pure_decode
    assert not plan.applies(inputs.attn_metadata, len(inputs.input_ids), only_decodes=True)


def greedy_with_and_without_the_plan(path: str, prompts: list[str], max_model_len: int = 512):
    from flashserve import LLM, SamplingParams

    llm = LLM(model=path, max_model_len=max_model_len)
    runner = llm.engine.runner
    assert runner.decode_plan is not None
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with_plan = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    plan, runner.decode_plan = runner.decode_plan, None
    try:
        without = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        runner.decode_plan = plan
    return with_plan, without


@pytest.mark.slow
def test_smollm2_greedy_tokens_with_and_without_the_plan(smollm2_gguf):
    """The default engine (dtype and quantization "auto") on whatever CPU this is runs the plan."""
    with_plan, without = greedy_with_and_without_the_plan(
        smollm2_gguf, ["The capital of France is", "def fibonacci(n):", "Once upon a time", "2 + 2 ="])
    assert with_plan == without


@pytest.mark.slow
def test_gemma3_greedy_tokens_with_and_without_the_plan(gemma3_gguf):
    """Gemma 3 270M Q4_K_M (Q5_0/Q8_0/Q6_K/Q4_K weights, sliding window 512): prompts past the
    window so that sliding layers drop their first keys during decode."""
    long = "The history of the printing press begins " + "with movable type and paper, " * 90
    with_plan, without = greedy_with_and_without_the_plan(gemma3_gguf, ["The capital of France is", long], 1024)
    assert with_plan == without
