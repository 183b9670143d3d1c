"""Our Llama/Qwen2/Gemma 3 against transformers on tiny random models, loaded from
safetensors and from GGUF: logits of a prefill and of 20 incremental decode steps."""
from __future__ import annotations

import pytest
import torch

from flashserve.core.sched_output import ScheduledRequest
from flashserve.model.loader import load_model
from flashserve.runner.input_batch import build_model_inputs
from flashserve.runner.kv_cache import allocate_kv_caches
from tests.model.tiny import VOCAB, hf_tiny, save_hf, write_gguf

ARCHS = ["llama", "qwen2", "gemma3"]
BLOCK = 4


def run_incremental(model, cfg, tokens: list[int], chunks: list[int]) -> torch.Tensor:
    """Feed `tokens` in steps of the given sizes through the paged cache; logits of every position.
    The cache keeps the compute dtype (not the engine's default float16 one): this compares the math."""
    dtype = model.dtype
    caches = allocate_kv_caches(cfg, num_blocks=2 + -(-len(tokens) // BLOCK), block_size=BLOCK, dtype=dtype,
                                device=torch.device("cpu"), kv_cache_dtype=str(dtype).removeprefix("torch."))
    model.bind_kv_caches(caches)
    blocks = list(range(1, 1 + -(-len(tokens) // BLOCK)))  # block 0 is the padding block
    done, out = 0, []
    for n in chunks:
        req = ScheduledRequest("r", tokens[: done + n], done, n, blocks, None, [])
        inputs = build_model_inputs([req], BLOCK, torch.device("cpu"))
        with torch.inference_mode():
            hidden = model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
            out.append(model.compute_logits(hidden))
        done += n
    return torch.cat(out)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    hf = hf_tiny(request.param)
    d = tmp_path_factory.mktemp(request.param)
    save_hf(hf, d / "hf")
    write_gguf(hf, d / "model.gguf")
    return request.param, hf, d


@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_prefill_and_decode_logits_match_transformers(tiny, source):
    arch, hf, d = tiny
    path = str(d / "hf") if source == "safetensors" else str(d / "model.gguf")
    model, cfg = load_model(path, dtype=torch.float32)
    assert cfg.architecture == arch
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (32,), generator=g).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()  # (32, vocab)
    ours = run_incremental(model, cfg, tokens, [12] + [1] * 20)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_one_shot(tiny):
    """Prefill split into uneven chunks (attention over a cached prefix) gives the same logits."""
    _, hf, d = tiny
    model, cfg = load_model(str(d / "hf"), dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(run_incremental(model, cfg, tokens, [7, 1, 9, 13]), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_quantized_gguf_matches_transformers_on_the_same_rounded_weights(tiny, qtype, tmp_path):
    """Quantized tensors in the file: our logits equal transformers' run on weights rounded
    through the same quantization (gguf's quantize → dequantize, applied to HF names here)."""
    import copy

    import gguf

    arch, hf, d = tiny
    path = write_gguf(hf, tmp_path / f"{qtype}.gguf", qtype=qtype)
    model, cfg = load_model(str(path), dtype=torch.float32)
    rounded = copy.deepcopy(hf)
    q = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                a = p.float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q).reshape(a.shape)))
    tokens = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = rounded(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(run_incremental(model, cfg, tokens, [10, 1, 5]), ref, atol=1e-4, rtol=1e-4)
