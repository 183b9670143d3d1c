"""GPTQ and AWQ checkpoints (flashserve/quantization): the packed layouts against the formats' documented
bit layouts decoded here word by word, GPTQ's error against round-to-nearest on a random linear, and a
tiny model quantized end to end: flashserve's int4 kernels on the written checkpoint against
transformers on the same checkpoint dequantized here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flashserve.entrypoints.cli import main
from flashserve.model.loader import load_model
from flashserve.quantization.calibrate import load_float_model, walk_layers
from flashserve.quantization.gptq import Hessian, gptq_quantize
from flashserve.quantization.int4_format import Int4Groups, pack, unpack
from flashserve.quantization.group_quant_weight import GroupQuantWeight
from flashserve.quantization.packed import PermutedInput
from flashserve.quantization.quantize import QuantizeArgs, quantize_model
from flashserve.quantization.rtn import fit_clipped_grid, rtn_quantize
from tests.model.test_models_vs_hf import run_incremental
from tests.model.tiny import VOCAB, hf_tiny, save_hf

README = Path(__file__).resolve().parents[2] / "README.md"  # calibration text the repository holds
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]


def nibbles(words: torch.Tensor) -> np.ndarray:
    """int32 (..., m) → (..., m, 8): nibble i = bits 4i..4i+3 of the word read as unsigned."""
    w = words.numpy().view(np.uint32)
    return np.stack([(w >> np.uint32(4 * i)) & np.uint32(15) for i in range(8)], axis=-1).astype(np.int64)


def dequantize_gptq(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """AutoGPTQ v1: qweight (K/8, N) packed along K, qzeros (K/g, N/8) along N holding zero - 1."""
    q = nibbles(t["qweight"])  # (K/8, N, 8): q[n, 8r + i] = q[r, n, i]
    k8, n = q.shape[:2]
    q = q.transpose(1, 0, 2).reshape(n, k8 * 8)
    z = nibbles(t["qzeros"]).reshape(t["qzeros"].shape[0], n) + 1  # (K/g, N)
    g = t["g_idx"].numpy()
    s = t["scales"].float().numpy()  # (K/g, N)
    return torch.from_numpy(((q - z[g].T) * s[g].T).astype(np.float32))


def dequantize_awq(t: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """AutoAWQ GEMM: qweight (K, N/8) and qzeros (K/g, N/8) packed along N in AWQ_ORDER."""
    def unorder(words):
        nib = nibbles(words)  # (rows, N/8, 8)
        out = np.empty_like(nib)
        out[:, :, AWQ_ORDER] = nib
        return out.reshape(words.shape[0], -1)  # (rows, N)

    q, z = unorder(t["qweight"]), unorder(t["qzeros"])  # (K, N), (K/g, N)
    g = np.arange(q.shape[0]) // group
    s = t["scales"].float().numpy()
    return torch.from_numpy(((q - z[g]) * s[g]).T.astype(np.float32))


def random_groups(n: int, k: int, group: int, shuffled: bool, seed: int = 0) -> Int4Groups:
    gen = torch.Generator().manual_seed(seed)
    g_idx = torch.arange(k) // group
    if shuffled:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    scale = (torch.rand(n, k // group, generator=gen) * 0.1 + 1e-3).half().float()
    return Int4Groups(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen), scale,
                      torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=gen), g_idx, group)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_pack_matches_documented_layout_and_round_trips(fmt):
    g = random_groups(24, 128, 32, shuffled=fmt == "gptq")
    if fmt == "gptq":
        g.zero.clamp_(min=1)  # v1 stores zero - 1 in a nibble: a zero of 0 does not survive other readers
    t = pack(fmt, g)
    want = torch.from_numpy(g.dequantize())
    got = dequantize_gptq(t) if fmt == "gptq" else dequantize_awq(t, 32)
    assert torch.equal(got, want)
    back = unpack(fmt, t, 32)
    for a, b in zip((back.codes, back.scale, back.zero, back.g_idx), (g.codes, g.scale, g.zero, g.g_idx)):
        assert torch.equal(a, b)
    if fmt == "gptq":  # a word read by hand: qweight[1, 5] holds q[5, 8..15], nibble 0 first
        word = int(t["qweight"][1, 5]) & 0xFFFFFFFF
        assert [(word >> 4 * i) & 15 for i in range(8)] == g.codes[5, 8:16].tolist()
    else:  # qweight[3, 1] holds q[8 + ORDER[i], 3] in nibble i
        word = int(t["qweight"][3, 1]) & 0xFFFFFFFF
        assert [(word >> 4 * i) & 15 for i in range(8)] == [int(g.codes[8 + o, 3]) for o in AWQ_ORDER]


@pytest.mark.parametrize("act_order,clip", [(False, False), (True, False), (False, True)])
def test_gptq_beats_round_to_nearest_on_its_calibration_inputs(act_order, clip):
    """The paper's claim on one linear: ||X W^T - X W'^T|| is smaller for GPTQ's W' than for RTN's on the same
    4-bit grid (symmetric, groups of 32), with correlated inputs and a few large channels."""
    gen = torch.Generator().manual_seed(0)
    k, n, t = 128, 32, 1024
    x = torch.randn(t, k, generator=gen) @ torch.randn(k, k, generator=gen) / k**0.5
    x[:, :6] *= 8.0
    w = torch.randn(n, k, generator=gen) * 0.05
    h = Hessian(k)
    h.add(x[:500])
    h.add(x[500:])
    torch.testing.assert_close(h.h, 2 * x.double().t() @ x.double() / t)
    err = lambda g: ((x @ (torch.from_numpy(g.dequantize()) - w).t()) ** 2).mean().item()  # noqa: E731
    gptq, rtn = gptq_quantize(w, h.h, 32, act_order=act_order, clip=clip), rtn_quantize(w, 32, sym=True)
    assert err(gptq) < 0.6 * err(rtn)
    assert torch.equal(torch.bincount(gptq.g_idx), torch.full((k // 32,), 32))


@pytest.mark.parametrize("sym", [True, False])
def test_clipped_grid_is_the_best_of_the_shrunk_ranges(sym):
    """fit_clipped_grid against a search written here one group at a time in numpy: for each fraction f of
    the range in 1.00, 0.99, ..., 0.75, the float16 step of f times the range (symmetric: 2 f max|w| / 15,
    zero 8; else f (max w - min w) / 15 over a range holding 0, zero rounded), codes rounded and clamped to
    0..15, and the sum of |error|^2.4; the first least one wins. Heavy-tailed groups, so that clipping pays."""
    w = torch.from_numpy(np.random.default_rng(3).standard_t(2.0, (6, 5, 64))).float() * 0.02
    s, z = fit_clipped_grid(w, sym)
    shrunk = 0
    for row in range(6):
        for g in range(5):
            v = w[row, g].double().numpy()
            best = None
            for f in np.arange(100, 74, -1) / 100:
                if sym:
                    step, zero = np.float16(2 * f * np.abs(v).max() / 15).astype(np.float64), 8.0
                else:
                    lo, hi = min(f * v.min(), 0.0), max(f * v.max(), 0.0)
                    step = np.float16((hi - lo) / 15).astype(np.float64)
                    zero = np.clip(np.round(-lo / step), 0, 15)
                q = np.clip(np.round(v / step + zero), 0, 15)
                err = (np.abs((q - zero) * step - v) ** 2.4).sum()
                if best is None or err < best[0]:
                    best = (err, step, zero, f)
            assert s[row, g].item() == pytest.approx(best[1], rel=1e-6) and z[row, g].item() == best[2]
            shrunk += best[3] < 1
    assert shrunk > 5  # the search did clip


def _byte_tokenizer():
    """A byte-level tokenizer whose ids are the 256 bytes: the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert len(alphabet) == VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_float") / "hf"
    save_hf(hf_tiny("llama"), d)
    _byte_tokenizer().save_pretrained(d)
    return d


def test_layer_walk_carries_each_quantized_layer_on(tiny_dir):
    """A method looks at a layer's outputs (run), then changes its weights: the next layer's inputs are the
    changed layer's outputs, as the model's own forward computes them afterwards."""
    model, _ = load_float_model(str(tiny_dir))
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    outs = []

    def method(i, layer, run):
        outs.append(run())
        if i == 0:
            layer.self_attn.v_proj.weight.data.mul_(2.0)

    walk_layers(model, ids, method, lambda layers: layers)
    seen = {}
    hook = model.model.layers[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    torch.testing.assert_close(outs[1], seen["out"])


def _reference(out: Path, fmt: str, group: int):
    """transformers' float model on the checkpoint dequantized by the functions above, and those weights."""
    import transformers as tf

    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    hf = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**config), dtype=torch.float32)
    tensors = load_file(out / "model.safetensors")
    state, dequantized = {}, {}
    for name in tensors:
        module, _, kind = name.rpartition(".")
        if kind == "qweight":
            parts = {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")
                     if f"{module}.{k}" in tensors}
            dequantized[module] = dequantize_gptq(parts) if fmt == "gptq" else dequantize_awq(parts, group)
            state[f"{module}.weight"] = dequantized[module]
        elif kind not in ("qzeros", "scales", "g_idx"):
            state[name] = tensors[name].float()
    hf.load_state_dict(state, strict=False)
    hf.config._attn_implementation = "eager"
    return hf.eval(), dequantized


@pytest.mark.parametrize("method,act_order", [("gptq", True), ("awq", False)])
def test_quantized_tiny_model_runs_the_checkpoint_exactly(tiny_dir, tmp_path, cpp_kernels, method, act_order):
    out = tmp_path / f"tiny-{method}"
    summary = quantize_model(QuantizeArgs(method=method, model=str(tiny_dir), out=str(out), group_size=32,
                                          calib=str(README), act_order=act_order, seq_len=64, max_seqs=8))
    assert summary["calibration_tokens"] == 8 * 64 and summary["peak_rss_mib"] > 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == method
    hf, dequantized = _reference(out, method, 32)
    model, cfg = load_model(str(out), dtype=torch.float32, quantization="weight-only")
    layer = model.model.layers[1]
    qkv = layer.self_attn.qkv_proj.qweight
    assert isinstance(qkv, PermutedInput if act_order else GroupQuantWeight)
    assert isinstance(qkv.inner if act_order else qkv, GroupQuantWeight)  # one kernel for q|k|v
    want = torch.cat([dequantized[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv"])
    assert torch.equal(qkv.dequantize(), want)  # exactly the checkpoint's weights
    assert torch.equal(layer.mlp.down_proj.qweight.dequantize(), dequantized["model.layers.1.mlp.down_proj"])
    tokens = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(run_incremental(model, cfg, tokens, [10] + [1] * 14), ref, atol=2e-4, rtol=2e-4)


def test_bad_input_is_refused_and_leaves_nothing(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [
        (["--group-size", "64", "--out", str(tmp_path / "a")], "group size 64 does not divide its row of 96"),
        (["--group-size", "32", "--calib", str(empty), "--out", str(tmp_path / "b")], "calibration text is empty"),
        (["--out", str(existing)], "exists"),
    ]
    for extra, message in cases:
        assert main(["quantize", "--method", "gptq", "--model", str(tiny_dir), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["quantize", "--method", "awq", "--clip", "--model", str(tiny_dir), "--out", str(tmp_path / "c")]) == 2
    assert "clip is a GPTQ option" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "existing"]
    assert not any(existing.iterdir())


def test_the_command_takes_as_many_calibration_sequences_as_asked(tiny_dir, tmp_path, capsys):
    """`flashserve quantize --max-seqs N`: at most N sequences of 512 tokens of --calib (the README holds
    more than 2 x 512 of them), and 16 by default."""
    for extra, tokens in (["--max-seqs", "2"], 2 * 512), ([], 16 * 512):
        out = tmp_path / f"gptq-{len(extra)}"
        assert main(["quantize", "--method", "gptq", "--model", str(tiny_dir), "--group-size", "32",
                     "--calib", str(README), "--out", str(out), *extra]) == 0
        printed = capsys.readouterr().out
        assert f"{tokens} calibration tokens" in printed, printed


@pytest.mark.parametrize("method", ["rtn", "rtn-sym"])
def test_the_round_to_nearest_baselines_use_their_own_grids(tiny_dir, tmp_path, method):
    """rtn is AWQ's grid (zero points fitted per group, written in the AWQ format), rtn-sym GPTQ's
    symmetric one (every zero 8, the GPTQ format): each checkpoint's zeros, read back, say which grid
    made it, and its weights are the round-to-nearest of the float ones on that grid."""
    out = tmp_path / method
    quantize_model(QuantizeArgs(method=method, model=str(tiny_dir), out=str(out), group_size=32))
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    parts = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx") if f"{name}.{k}" in tensors}
    groups = unpack("gptq" if method == "rtn-sym" else "awq", parts, 32)
    float_model = load_float_model(str(tiny_dir))[0]
    want = rtn_quantize(float_model.get_submodule(name).weight.data, 32, sym=method == "rtn-sym")
    assert torch.equal(groups.zero, want.zero) and torch.equal(groups.codes, want.codes)
    if method == "rtn-sym":
        assert bool((groups.zero == 8).all())
    else:
        assert len(torch.unique(groups.zero)) > 1  # fitted per group
