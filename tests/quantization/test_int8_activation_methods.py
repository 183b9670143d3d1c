"""quantization="smoothquant" and "llm.int8": each matmul against the papers' formulas evaluated directly
in numpy, SmoothQuant's folding against the unsmoothed float model (and its scales against
activations transformers computes), and SmolLM2 end to end against the float engine."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flashserve.config import ActivationQuantConfig
from flashserve.errors import FlashserveError, ModelFormatError
from flashserve.model.loader import load_model
from flashserve.quantization.calibrate import engine_input_maxima
from flashserve.quantization.int8_outlier import OutlierInt8Weight
from flashserve.quantization.smoothquant import smooth, smoothed_pairs
from flashserve.quantization.w8a8 import EXACT_FLOAT_K, QMAX, W8A8Weight, int8_dot, int8_dot_float
from tests.model.test_models_vs_hf import run_incremental
from tests.model.tiny import VOCAB, hf_tiny, save_hf, write_gguf
from tests.quantization.test_int4_checkpoints import README, _byte_tokenizer

HELD_OUT = "/usr/share/common-licenses/Apache-2.0"


def _np_rowwise_int8(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absmax int8 per row, in float32 as the formula is written: q = rint(a / (max|a| / 127))."""
    scale = (np.abs(a).max(axis=1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    return np.clip(np.rint(a / scale[:, None]), -127, 127).astype(np.int64), scale.astype(np.float64)


def _np_int8_product(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    xq, sx = _np_rowwise_int8(x)
    wq, sw = _np_rowwise_int8(w)
    return (xq @ wq.T) * sx[:, None] * sw[None, :]


def _operands(seed: int, outlier: float):
    g = np.random.default_rng(seed)
    w = g.standard_normal((40, 72)).astype(np.float32) * 0.05
    x = g.standard_normal((5, 72)).astype(np.float32)
    x[2, 7] = outlier  # one large activation in column 7 (one token)
    x[:, 30] *= outlier / 2  # and a column large in every token
    return x, w


def test_w8a8_matmul_is_per_token_times_per_channel_int8():
    x, w = _operands(0, 20.0)
    got = W8A8Weight(torch.from_numpy(w))(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(got, _np_int8_product(x, w), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [72, EXACT_FLOAT_K, EXACT_FLOAT_K + 1, 4096 + 17])
def test_int8_dot_products_are_exact_on_both_paths(k):
    """The float32 route and torch's integer GEMM give numpy's int64 sums, at the worst case too (rows of
    +-127 long enough that one float32 product over all of K would lose integers)."""
    g = np.random.default_rng(k)
    xq = g.integers(-QMAX, QMAX + 1, (5, k))
    wq = g.integers(-QMAX, QMAX + 1, (9, k))
    xq[0], wq[0], wq[1] = QMAX, QMAX, -QMAX  # sums of +-127^2 K: past 2^24 once K > EXACT_FLOAT_K
    want = xq @ wq.T
    x8, w8 = torch.from_numpy(xq).to(torch.int8), torch.from_numpy(wq).to(torch.int8)
    for got in (int8_dot_float(x8, w8), torch._int_mm(x8, w8.t()), int8_dot(x8, w8)):
        assert got.dtype == torch.int32
        np.testing.assert_array_equal(got.numpy(), want)


def test_llm_int8_takes_outlier_columns_in_float():
    x, w = _operands(1, 20.0)
    layer = OutlierInt8Weight(torch.from_numpy(w), threshold=6.0)
    got = layer(torch.from_numpy(x)).double().numpy()
    outliers = np.abs(x).max(axis=0) >= 6.0  # columns 7 and 30 (and any random value that big)
    assert outliers[7] and outliers[30]
    w16 = w.astype(np.float16).astype(np.float64)
    want = x[:, outliers].astype(np.float64) @ w16[:, outliers].T + _np_int8_product(np.where(outliers, 0, x), w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without outliers it is the plain W8A8 product; with them it is much closer to float than that.
    small = np.clip(x, -5.0, 5.0)
    np.testing.assert_allclose(layer(torch.from_numpy(small)).double().numpy(), _np_int8_product(small, w),
                               rtol=1e-6, atol=1e-7)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(got - exact).max() < 0.2 * np.abs(_np_int8_product(x, w) - exact).max()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random Llama and Qwen2 (biases) as HF directories with a byte tokenizer, beside transformers' models."""
    out = {}
    for arch in ("llama", "qwen2"):
        d = tmp_path_factory.mktemp(f"tiny_{arch}")
        hf = hf_tiny(arch, seed=1)
        save_hf(hf, d)
        _byte_tokenizer().save_pretrained(d)
        out[arch] = (str(d), hf)
    return out


@pytest.mark.parametrize("arch,down_proj", [("llama", False), ("qwen2", False), ("llama", True)])
def test_smoothing_leaves_the_float_model_unchanged(tiny_dirs, arch, down_proj):
    """Maxima taken through flashserve's model equal the inputs transformers' linears see; the scales
    follow eq. 4 computed here from those (down_proj's folded into up_proj's rows when asked); folding
    them changes no logit beyond float rounding."""
    path, hf = tiny_dirs[arch]
    model, cfg = load_model(path, torch.float32, quantization="none")
    tokens = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    before = run_incremental(model, cfg, tokens, [10] + [1] * 14)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(6))
    linears = [lin for layer in model.model.layers for _, lin in smoothed_pairs(layer, down_proj)]
    maxima = engine_input_maxima(model, cfg, ids, linears)

    seen: dict[str, np.ndarray] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.__setitem__(name, np.maximum(
            seen.get(name, 0), args[0].abs().reshape(-1, args[0].shape[-1]).amax(0).numpy())))
        for name, m in hf.named_modules() if name.endswith(("q_proj", "gate_proj", "down_proj"))]
    with torch.no_grad():
        for row in ids:
            hf(row[None])
    for h in hooks:
        h.remove()
    alpha = 0.5
    want_norms, want_up = [], []
    for i, layer in enumerate(model.model.layers):
        hl = hf.model.layers[i]
        for (norm, lin), (hf_norm, hf_in, parts) in zip(smoothed_pairs(layer), [
                (hl.input_layernorm, f"model.layers.{i}.self_attn.q_proj", [hl.self_attn.q_proj, hl.self_attn.k_proj,
                                                                             hl.self_attn.v_proj]),
                (hl.post_attention_layernorm, f"model.layers.{i}.mlp.gate_proj", [hl.mlp.gate_proj, hl.mlp.up_proj])]):
            # the engine's float16 KV cache (its default, as it serves) shifts layer 1's inputs by ~1e-4
            np.testing.assert_allclose(maxima[lin].numpy(), seen[hf_in], rtol=1e-3, atol=1e-6)
            w = np.concatenate([p.weight.detach().numpy() for p in parts]).astype(np.float64)
            s = seen[hf_in].astype(np.float64) ** alpha / np.abs(w).max(axis=0) ** (1 - alpha)
            want_norms.append(hf_norm.weight.detach().numpy() / s)
        down = hl.mlp.down_proj.weight.detach().numpy().astype(np.float64)
        s_down = seen[f"model.layers.{i}.mlp.down_proj"].astype(np.float64) ** alpha / np.abs(down).max(0) ** (1 - alpha)
        want_up.append(hl.mlp.up_proj.weight.detach().numpy() * s[None, :] / s_down[:, None])  # s: gate|up's
    smooth(model.model.layers, maxima, alpha, down_proj)
    got_norms = [norm.weight.numpy() for layer in model.model.layers for norm, _ in smoothed_pairs(layer)]
    for got, want in zip(got_norms, want_norms):
        np.testing.assert_allclose(got, want, rtol=2e-4)
    hf_norms = [n.weight.detach().numpy() for hl in hf.model.layers for n in (hl.input_layernorm,
                                                                               hl.post_attention_layernorm)]
    assert max(np.abs(np.log(g / n)).max() for g, n in zip(got_norms, hf_norms)) > 0.5  # the scales do move
    if down_proj:
        for layer, want in zip(model.model.layers, want_up):
            np.testing.assert_allclose(layer.mlp.gate_up_proj.part_weight("up").numpy(), want, rtol=5e-4, atol=1e-7)
    after = run_incremental(model, cfg, tokens, [10] + [1] * 14)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("method", ["smoothquant", "llm.int8"])
def test_tiny_models_load_with_int8_linears(tiny_dirs, method, tmp_path):
    """From an HF directory and (LLM.int8(); the tiny GGUF has no tokenizer for SmoothQuant's calibration text,
    SmolLM2's below does) from a GGUF file: every decoder linear int8, logits near the float model's."""
    path, hf = tiny_dirs["llama"]
    sources = [path] + ([str(write_gguf(hf, tmp_path / "tiny.gguf", "Q8_0"))] if method == "llm.int8" else [])
    tokens = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(7)).tolist()
    options = ActivationQuantConfig(calibration_text=str(README)) if method == "smoothquant" else None
    for source in sources:
        ref_model, cfg = load_model(source, torch.float32, quantization="none")
        ref = run_incremental(ref_model, cfg, tokens, [16])
        model, _ = load_model(source, torch.float32, quantization=method, activation_quant=options)
        kind = W8A8Weight if method == "smoothquant" else OutlierInt8Weight
        layer = model.model.layers[0]
        assert all(isinstance(m.qweight, kind) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                         layer.mlp.gate_up_proj, layer.mlp.down_proj))
        got = run_incremental(model, cfg, tokens, [16])
        assert (got - ref).abs().max() < 0.05 * ref.abs().max(), source


def test_bad_combinations_are_refused(tiny_dirs, tmp_path):
    from flashserve.config import EngineConfig
    from flashserve.engine.arg_utils import EngineArgs
    from flashserve.entrypoints.cli import build_parser
    from flashserve.entrypoints.cli_flags import engine_args_from

    path, _ = tiny_dirs["llama"]
    with pytest.raises(ValueError, match="llm_int8_threshold is an option of quantization='llm.int8'"):
        EngineArgs(model=path, quantization="smoothquant", llm_int8_threshold=4.0).create_engine_config()
    with pytest.raises(ValueError, match="smoothquant_alpha must be in"):
        EngineArgs(model=path, quantization="smoothquant", smoothquant_alpha=1.5).create_engine_config()
    with pytest.raises(ValueError, match="max_weight_memory"):
        EngineArgs(model=path, quantization="llm.int8", max_weight_memory=1 << 30).create_engine_config()
    config = EngineArgs(model=path, quantization="llm.int8", llm_int8_threshold=4.0).create_engine_config()
    assert isinstance(config, EngineConfig) and config.activation_quant.llm_int8_threshold == 4.0
    args = build_parser().parse_args(["serve", "--model", path, "--quantization", "smoothquant",
                                      "--smoothquant-alpha", "0.8", "--calibration-text", str(README),
                                      "--smoothquant-down-proj"])
    engine_args = engine_args_from(args)
    assert (engine_args.smoothquant_alpha, engine_args.calibration_text, engine_args.smoothquant_down_proj) == (
        0.8, str(README), True)
    assert engine_args.create_engine_config().activation_quant.smoothquant_down_proj
    from flashserve.engine.arg_utils import resolve_dtype

    assert resolve_dtype("auto", path, "llm.int8").dtype == "float32"  # whatever the CPU's bfloat16
    with pytest.raises(ValueError, match="smoothquant_down_proj is an option of quantization='smoothquant'"):
        EngineArgs(model=path, quantization="llm.int8", smoothquant_down_proj=True).create_engine_config()

    gptq = tmp_path / "gptq"
    shutil.copytree(path, gptq)
    config_json = json.loads((gptq / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    (gptq / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ModelFormatError, match="GPTQ/AWQ checkpoint; quantization='smoothquant' needs float"):
        load_model(str(gptq), quantization="smoothquant")
    gemma = write_gguf(hf_tiny("gemma3"), tmp_path / "gemma.gguf")
    with pytest.raises(ModelFormatError, match="Llama-family norms"):
        load_model(str(gemma), quantization="smoothquant")
    with pytest.raises(FlashserveError, match="cannot read the calibration text"):
        load_model(path, quantization="smoothquant",
                   activation_quant=ActivationQuantConfig(calibration_text=str(tmp_path / "missing.txt")))


def _perplexity(llm, chunk: list[int]) -> float:
    from flashserve import SamplingParams

    out = llm.generate([{"prompt_token_ids": chunk}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll = [-out[0].prompt_logprobs[p][chunk[p]].logprob for p in range(1, len(chunk))]
    return math.exp(sum(nll) / len(nll))


PROMPTS = ["The three primary colours are", "def fibonacci(n):", "Paris is the capital of"]


@pytest.mark.parametrize("method", ["smoothquant", "llm.int8"])
def test_smollm2_stays_close_to_float(smollm2_gguf, smollm2_llm, method):
    """Held-out perplexity within 5% of the float engine's; greedy outputs equal up to a first divergence
    where each engine's token is among the other's top 5 (a near-tie, not a broken model)."""
    from flashserve import LLM, SamplingParams

    llm = LLM(model=smollm2_gguf, dtype="float32", kv_cache_dtype="float32", quantization=method, max_model_len=1024)
    chunk = llm.get_tokenizer().encode(Path(HELD_OUT).read_text(), add_special_tokens=False)[:384]
    ref_ppl, ppl = _perplexity(smollm2_llm, chunk), _perplexity(llm, chunk)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, logprobs=5)
    wants = smollm2_llm.generate(PROMPTS, greedy, use_tqdm=False)
    gots = llm.generate(PROMPTS, greedy, use_tqdm=False)
    firsts = []
    for want, got in zip(wants, gots):
        w, g = want.outputs[0], got.outputs[0]
        first = next((i for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids)) if a != b), None)
        firsts.append(first)
        if first is not None:
            assert w.token_ids[first] in g.logprobs[first] and g.token_ids[first] in w.logprobs[first]
    print(f"{method}: perplexity {ppl:.3f} vs float {ref_ppl:.3f}; first greedy divergences {firsts} of 24")
    assert abs(ppl / ref_ppl - 1) < 0.05
