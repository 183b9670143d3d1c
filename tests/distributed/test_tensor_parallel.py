"""Tensor parallelism (distributed/): two worker processes over gloo give what one process gives.

Independent references: transformers' logits for float weights, the one-process engine for
quantized ones (its own checks against transformers live in tests/model and tests/engine), and
the unsplit packed weight's dequantization for each shard. Which rank owns what is checked as
arithmetic (partition.py) without processes.
"""
from __future__ import annotations

import multiprocessing

import pytest
import torch

from flashserve import SamplingParams
from flashserve.distributed.partition import tp_shards
from flashserve.engine.arg_utils import EngineArgs
from flashserve.engine.llm_engine import LLMEngine
from flashserve.model.loader import load_model_config
from tests.model.tiny import VOCAB, hf_tiny, write_gguf

PROMPTS = [[1, 5, 9, 33, 70, 100], [7, 200, 3, 3, 41, 90, 12, 250, 8], [150, 2, 77]]
ENGINE = dict(dtype="float32", kv_cache_dtype="float32", max_model_len=128, kv_cache_memory=1 << 22)
TOP_N = 5


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    """Detokenizes the tiny models' ids (their GGUF files carry no tokenizer)."""
    from flashserve.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_model_path(smollm2_gguf)


def run(path: str, tokenizer, prompts=PROMPTS, max_tokens: int = 12, on_step=None, **kwargs):
    """Greedy completions (CompletionOutput, top-N logprobs) of `prompts`, in order; the engine is shut down.
    `on_step(engine, outputs)` sees the engine after each step."""
    engine = LLMEngine(EngineArgs(model=path, **{**ENGINE, **kwargs}).create_engine_config(), tokenizer=tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=TOP_N, ignore_eos=True)
    try:
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": ids}, params)
        done = {}
        while engine.has_unfinished_requests():
            outputs = engine.step()
            done.update({o.request_id: o.outputs[0] for o in outputs if o.finished})
            if on_step is not None:
                on_step(engine, outputs)
    finally:
        engine.shutdown()
    return [done[str(i)] for i in range(len(prompts))]


def assert_logprobs_close(a, b, tol: float) -> None:
    for x, y in zip(a, b):
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert lx.keys() == ly.keys()
            for t in lx:
                assert abs(lx[t].logprob - ly[t].logprob) < tol


# --- who owns what --------------------------------------------------------------------------------

def _cfg(**kw):
    from flashserve.config import ModelConfig

    base = dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=1,
                num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_partition_splits_kv_groups_unevenly_and_replicates_scarce_kv_heads():
    # SmolLM2-135M: 3 KV groups of 3 query heads over 2 ranks → 2 groups | 1 group
    r0, r1 = tp_shards(_cfg(), 2)
    assert (r0.q_heads, r0.kv_heads, r1.q_heads, r1.kv_heads) == ((0, 6), (0, 2), (6, 9), (2, 3))
    assert (r0.intermediate, r1.intermediate) == ((0, 768), (768, 1536))  # 3 units of 256 each
    assert (r0.vocab, r1.vocab, r0.vocab_shard) == ((0, 24576), (24576, 49152), 24576)
    # Qwen2.5-0.5B: 14 query heads, 2 KV heads; 2 ranks own one KV head each, 4 ranks replicate each on 2
    q2 = tp_shards(_cfg(num_heads=14, num_kv_heads=2, intermediate_size=4864, vocab_size=151655), 2)
    assert [s.kv_heads for s in q2] == [(0, 1), (1, 2)] and [s.num_heads for s in q2] == [7, 7]
    assert [s.intermediate for s in q2] == [(0, 2560), (2560, 4864)]  # 19 super-blocks of 256: 10 | 9
    assert q2[1].vocab == (75828, 151655) and q2[1].vocab_shard == 75828  # odd vocabulary: last shard short
    mqa = tp_shards(_cfg(num_heads=4, num_kv_heads=1, intermediate_size=96), 2)
    assert [(s.q_heads, s.kv_heads) for s in mqa] == [((0, 2), (0, 1)), ((2, 4), (0, 1))]
    assert [s.intermediate for s in mqa] == [(0, 64), (64, 96)]  # 3 GGUF blocks of 32: 2 | 1


def test_partition_names_what_does_not_split():
    with pytest.raises(ValueError, match="7 query heads of each of the model's 2 KV heads do not split over the 2"):
        tp_shards(_cfg(num_heads=14, num_kv_heads=2), 4)
    with pytest.raises(ValueError, match="must divide or be a multiple of the model's 2 KV heads"):
        tp_shards(_cfg(num_heads=14, num_kv_heads=2), 3)


def test_engine_args_refuse_more_ranks_than_cores(tiny_llama):
    from flashserve.config import usable_cores

    path, _ = tiny_llama
    with pytest.raises(ValueError, match=f"tensor_parallel_size={usable_cores() + 1} exceeds the {usable_cores()} CPU"):
        EngineArgs(model=path, tensor_parallel_size=usable_cores() + 1).create_engine_config()
    with pytest.raises(ValueError, match="'uni' runs one rank"):
        EngineArgs(model=path, tensor_parallel_size=2, distributed_executor_backend="uni").create_engine_config()
    with pytest.raises(ValueError, match="unknown distributed_executor_backend 'slurm'"):
        EngineArgs(model=path, distributed_executor_backend="slurm").create_engine_config()


# --- shards of packed weights ---------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_weight_shards_stay_packed_and_equal_slices_of_the_whole(cpp_kernels, qtype):
    import gguf

    from flashserve.distributed.weight_shards import cols_of, rows_of
    from flashserve.quantization.gguf_blocks import GGUFTensor
    from flashserve.quantization.gguf_method import pack_linear

    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(0)).numpy()
    q = gguf.GGMLQuantizationType[qtype]
    packed = pack_linear([GGUFTensor(gguf.quants.quantize(w, q), q, w.shape)], torch.float32)
    whole = packed.dequantize()
    rows = rows_of(packed, [(0, 5), (20, 48)])
    cols = cols_of(packed, 256, 512)
    assert type(rows) is type(packed) and type(cols) is type(packed)
    assert rows.codes.dtype == packed.codes.dtype and rows.bits == packed.bits  # still packed, same bits
    torch.testing.assert_close(rows.dequantize(), torch.cat([whole[0:5], whole[20:48]]), rtol=0, atol=0)
    torch.testing.assert_close(cols.dequantize(), whole[:, 256:512], rtol=0, atol=0)
    x = torch.randn(3, 256)
    torch.testing.assert_close(cols(x), x @ whole[:, 256:512].T, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="do not fall on its 32-value groups"):
        cols_of(packed, 16, 512)


def _describe_shards(path: str, rank: int, port: int, out) -> None:
    """Rank `rank` of 2: load and shard the model, report each weight's form and shape."""
    from flashserve.distributed.parallel_state import TPGroup
    from flashserve.distributed.tensor_parallel import shard_model
    from flashserve.model.loader import load_model

    torch.set_num_threads(1)
    group = TPGroup.join(rank, 2, f"tcp://127.0.0.1:{port}", torch.device("cpu"), 60)
    model, cfg = load_model(path, quantization="auto")
    local = shard_model(model, tp_shards(cfg, 2)[rank], group)
    layer = model.model.layers[0]
    forms = {name: (type(m.qweight).__name__, m.qweight.bits, m.qweight.out_features, m.qweight.in_features)
             for name, m in [("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj),
                             ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj),
                             ("embed", model.model.embed_tokens.local)]}
    out.put((rank, local.num_heads, local.num_kv_heads, forms))
    group.destroy()


def test_smollm2_shards_stay_quantized(smollm2_gguf, cpp_kernels):
    """Both ranks of SmolLM2-135M (Q4_1 layers, Q8_0 embedding) keep 4-bit and 8-bit codes, in the
    sizes partition.py gives them."""
    from flashserve.distributed.multiproc import _free_port

    ctx = multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_describe_shards, args=(smollm2_gguf, r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict((r, rest) for r, *rest in (out.get(timeout=120) for _ in procs))
    finally:
        for p in procs:
            p.join(30)
            p.kill()
    cfg = load_model_config(smollm2_gguf)
    for rank, shard in enumerate(tp_shards(cfg, 2)):
        heads, kv_heads, forms = got[rank]
        assert (heads, kv_heads) == (shard.num_heads, shard.num_kv_heads)
        d, n = cfg.head_dim, shard.intermediate_size
        assert forms == {
            "qkv": ("GroupQuantWeight", 4, (heads + 2 * kv_heads) * d, cfg.hidden_size),
            "o": ("GroupQuantWeight", 4, cfg.hidden_size, heads * d),
            "gate_up": ("GroupQuantWeight", 4, 2 * n, cfg.hidden_size),
            "down": ("GroupQuantWeight", 4, cfg.hidden_size, n),
            "embed": ("GroupQuantWeight", 8, shard.vocab[1] - shard.vocab[0], cfg.hidden_size),
        }


# --- two processes give what one gives --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp_tiny")
    models = {arch: hf_tiny(arch) for arch in ("llama", "qwen2", "gemma3")}
    files = {(arch, q): str(write_gguf(models[arch], d / f"{arch}-{q}.gguf", qtype=q))
             for arch, q in [("llama", "F32"), ("qwen2", "F32"), ("gemma3", "F32"), ("llama", "Q4_1"),
                             ("qwen2", "Q8_0"), ("gemma3", "Q5_0")]}
    return models, files


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tp2_float_logprobs_match_transformers(tiny_files, tokenizer, arch):
    """Float weights: TP=2 logprobs of every generated position against transformers' own forward
    of prompt + completion (GQA 4:2 split, MQA's one KV head replicated, Gemma 3's sliding window)."""
    models, files = tiny_files
    outs = run(files[arch, "F32"], tokenizer, tensor_parallel_size=2)
    hf = models[arch]
    for ids, out in zip(PROMPTS, outs):
        seq = ids + list(out.token_ids)
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0, len(ids) - 1 : -1].float(), -1)
        assert list(out.token_ids) == ref.argmax(-1).tolist()
        for j, lps in enumerate(out.logprobs):
            for t, lp in lps.items():
                assert abs(lp.logprob - ref[j, t].item()) < 1e-4, (arch, j, t)


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_1"), ("qwen2", "Q8_0"), ("gemma3", "Q5_0")])
def test_tp2_quantized_tokens_equal_one_process(tiny_files, tokenizer, arch, qtype):
    """Quantized weights (4-, 8- and 5-bit codes, int8 activations): the same greedy tokens as one
    process, and logprobs close to them. Not within float32 summation order: the all-reduced sums
    feed the next layer's rounding of activations to int8, where a last-bit change can move a code
    by one step (1.6e-3 seen on Gemma 3)."""
    _, files = tiny_files
    one = run(files[arch, qtype], tokenizer, quantization="auto")
    two = run(files[arch, qtype], tokenizer, quantization="auto", tensor_parallel_size=2)
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert_logprobs_close(two, one, 1e-2)
