"""Hot/cold FFN neurons (offload/neuron_profile.py, neuron_predictor.py, hot_cold.py) on tiny random
models: the profile against transformers' own MLP activations, placement against the dense model,
the predictor off (or rejected) bit for bit against a model loaded without a profile."""
from __future__ import annotations

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.errors import FlashserveError
from flashserve.model.loader import load_model
from flashserve.offload import hot_cold
from flashserve.offload.neuron_predictor import train_predictors
from flashserve.offload.neuron_profile import NeuronProfile, activity, profile_neurons
from flashserve.quantization.calibrate import engine_prefill, own_kv_cache
from tests.model.tiny import hf_tiny, save_hf

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    """(directory, transformers model) of a tiny random model: SiLU (llama) or GELU (gemma3) MLPs."""
    d = tmp_path_factory.mktemp(f"tiny_{request.param}")
    hf = hf_tiny(request.param)
    save_hf(hf, d)
    return str(d), hf


def _hidden(model, ids=IDS):
    with own_kv_cache(model, model.config, ids.shape[1]):
        return torch.cat([engine_prefill(model, seq) for seq in ids.tolist()])


def test_profile_counts_transformers_mlp_activity(tiny):
    path, hf = tiny
    model, cfg = load_model(path, dtype=torch.float32, quantization="none")
    profile, samples = profile_neurons(model, cfg, IDS, threshold=0.05, keep_samples=True)

    acts = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: acts.setdefault(i, []).append(a[0][0]))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        for seq in IDS:
            hf(seq[None])
    for h in hooks:
        h.remove()
    for i, layer in enumerate(hf.model.layers):
        a = torch.cat(acts[i])  # (tokens, I): transformers' act(gate) * up
        expected = activity(a, layer.mlp.down_proj.weight.norm(dim=0), 0.05)
        # float rounding may flip a neuron sitting on the threshold, nothing more
        assert (profile.active_counts[i] - expected.sum(0)).abs().sum() <= 0.002 * expected.numel()
        assert profile.sparsity[i] == pytest.approx(1 - expected.float().mean().item(), abs=2e-3)
        assert (samples[i][1] != expected).float().mean() < 2e-3
    assert profile.num_tokens == IDS.numel() and ((profile.dropped_error > 0) & (profile.dropped_error < 1)).all()


def test_placement_is_a_permutation_and_unplacing_is_exact(tiny, tmp_path):
    path, _ = tiny
    model, cfg = load_model(path, dtype=torch.float32, quantization="none")
    before = [{k: v.clone() for k, v in layer.mlp.state_dict().items()} for layer in model.model.layers]
    dense = _hidden(model)
    profile, _ = profile_neurons(model, cfg, IDS, threshold=0.05)
    x = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    references = [_mlp_float64(layer.mlp, x, cfg.hidden_act) for layer in model.model.layers]
    placed = hot_cold.place(model, profile, hot_fraction=0.25, use_predictor=False)  # every cold neuron computed
    for mlp, ref in zip(placed, references):
        assert mlp.order.tolist() != list(range(cfg.intermediate_size))  # really reordered
        torch.testing.assert_close(mlp(x).double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    # the same function; Gemma's norms after each MLP magnify float32 rounding of its small outputs
    torch.testing.assert_close(_hidden(model), dense, rtol=1e-3, atol=1e-3)
    hot_cold.unplace(model)
    for layer, state in zip(model.model.layers, before):
        assert all(torch.equal(layer.mlp.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(_hidden(model), dense)


def _mlp_float64(mlp, x, hidden_act):
    """The gated MLP in float64 from its unpermuted weights: D (act(G x) * U x)."""
    gate, up = (x.double() @ mlp.gate_up_proj.weight.double().T).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) if hidden_act == "silu" else torch.nn.functional.gelu(gate, approximate="tanh")
    return (act * up) @ mlp.down_proj.weight.double().T


def test_predictor_learns_a_low_rank_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=g)
    rule = torch.randn(16, 4, generator=g) @ torch.randn(4, 40, generator=g)
    active = x @ rule > 0.5  # (N, I): what a rank-4 predictor can learn exactly
    p = train_predictors([(x, active)], rank=4, steps=300, target_recall=0.99)
    assert p["recall"][0] > 0.97  # held out
    assert p["predicted_active"][0] < active.float().mean() + 0.15  # and not by calling everything active


def _llm(path, **kw):
    return LLM(model=path, dtype="float32", quantization="none", block_size=4, **kw)


def _generate(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)
    return [(o.outputs[0].token_ids, [sorted(lp.items()) for lp in o.outputs[0].logprobs])
            for o in llm.generate([{"prompt_token_ids": seq[:6]} for seq in IDS.tolist()], params, use_tqdm=False)]


def _profile_file(tiny_llama, tmp_path, cutoff: float) -> str:
    model, cfg = load_model(tiny_llama[0], dtype=torch.float32, quantization="none")
    profile, samples = profile_neurons(model, cfg, IDS, threshold=0.05, keep_samples=True)
    profile.predictor = train_predictors(samples, rank=4, steps=5)
    profile.predictor["cutoff"].fill_(cutoff)
    out = tmp_path / f"profile{cutoff}.pt"
    profile.save(out)
    return str(out)


def test_predictor_off_or_rejected_is_bit_identical_to_dense(tiny_llama, tmp_path, caplog):
    dense = _generate(_llm(tiny_llama[0]))
    skip_all = _profile_file(tiny_llama, tmp_path, cutoff=float("inf"))  # every cold neuron skipped
    assert _generate(_llm(tiny_llama[0], hot_neuron_profile=skip_all)) == dense  # predictor off: untouched
    with caplog.at_level("WARNING"):  # skipping 90% of every MLP changes greedy tokens: runs dense
        rejected = _llm(tiny_llama[0], hot_neuron_profile=skip_all, neuron_predictor=True, hot_neuron_fraction=0.1)
    assert "the model runs dense" in caplog.text
    assert _generate(rejected) == dense


def test_predictor_that_keeps_every_neuron_stays_on(tiny_llama, tmp_path):
    keep_all = _profile_file(tiny_llama, tmp_path, cutoff=float("-inf"))
    llm = _llm(tiny_llama[0], hot_neuron_profile=keep_all, neuron_predictor=True)
    mlps = [layer.mlp for layer in llm.engine.executor.runner.model.model.layers]
    assert all(isinstance(m, hot_cold.HotColdMLP) for m in mlps)
    dense = _generate(_llm(tiny_llama[0]))
    assert [ids for ids, _ in _generate(llm)] == [ids for ids, _ in dense]
    assert all(m.cold_computed == m.steps * m.num_cold for m in mlps)


def test_bad_profiles_are_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="quantization='none'"):
        LLM(model=tiny_llama[0], hot_neuron_profile="p.pt")
    with pytest.raises(ValueError, match="options of hot_neuron_profile"):
        LLM(model=tiny_llama[0], neuron_predictor=True)
    with pytest.raises(FlashserveError, match="no such neuron profile"):
        _llm(tiny_llama[0], hot_neuron_profile=str(tmp_path / "missing.pt"))
    other = NeuronProfile("llama", 0.05, 1, torch.zeros(3, 7, dtype=torch.int64), torch.zeros(3), torch.zeros(3))
    other.save(tmp_path / "other.pt")
    with pytest.raises(FlashserveError, match="3 layers of 7 neurons"):
        _llm(tiny_llama[0], hot_neuron_profile=str(tmp_path / "other.pt"))
    fits = NeuronProfile("llama", 0.05, 1, torch.zeros(2, 96, dtype=torch.int64), torch.zeros(2), torch.zeros(2))
    fits.save(tmp_path / "fits.pt")
    with pytest.raises(FlashserveError, match="no trained predictor"):
        _llm(tiny_llama[0], hot_neuron_profile=str(tmp_path / "fits.pt"), neuron_predictor=True)


def test_cli_writes_a_profile_and_its_flags_reach_the_engine_config(smollm2_gguf, tmp_path, capsys):
    from flashserve.entrypoints.cli import build_parser, main
    from flashserve.entrypoints.cli_flags import engine_args_from

    out, text = tmp_path / "p.pt", tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    assert main(["profile-neurons", "--model", smollm2_gguf, "--calib", str(text), "--out", str(out),
                 "--seq-len", "16", "--max-seqs", "2", "--predictor-rank", "2", "--target-recall", "0.9"]) in (0, None)
    printed = capsys.readouterr().out
    profile = NeuronProfile.load(out)
    assert (profile.architecture, profile.num_tokens, profile.intermediate_size) == ("llama", 32, 1536)
    assert profile.predictor["a"].shape == (30, 576, 2) and len(profile.check_prompts) == 3
    assert profile.predictor["target_recall"] == 0.9
    assert "held-out recall" in printed and "   29  " in printed
    a = build_parser().parse_args(["generate", "--prompt", "x", "--model", smollm2_gguf, "--quantization", "none",
                                   "--hot-neuron-profile", str(out), "--hot-neuron-fraction", "0.3",
                                   "--neuron-predictor", "--neuron-predictor-max-disagreement", "0.1"])
    hot = engine_args_from(a).create_engine_config().hot_neurons
    assert (hot.profile, hot.hot_fraction, hot.predictor, hot.max_disagreement) == (str(out), 0.3, True, 0.1)
