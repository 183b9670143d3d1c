"""Hot/cold FFN neurons with the activity predictor on a SiLU model: per-layer activation sparsity,
the predictor's held-out recall, greedy agreement with the dense model and decode tok/s, each
configuration in its own process, alternated over rounds.

    python benchmarks/hot_neurons.py [--model smollm2-135m] [--profile FILE] [--rounds 3] [--tokens 32]
                                     [--hot-fraction 0.2] [--seqs 1,8]

Configurations (float32, quantization none, as the hot/cold path needs float rows):
    dense            the model as loaded: pure decode steps run in the C++ decode plan
    dense, modules   the same model with the decode plan off (the module path the predictor runs on)
    predictor        --neuron-predictor with max disagreement 1 (kept on whatever it changes, to time it)
    predictor, strict  the default: kept only if no greedy check token changes, else the model runs dense
Greedy agreement is over 4 prompts of `--tokens` tokens against dense's tokens, up to each prompt's
first divergence (offload/hot_cold.py's agreement). "cold computed" is the fraction of cold neurons
the predictor let through, over all layers and steps. Decode tok/s counts generated tokens after
every request has its first one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import decode_tok_s

CONFIGS = ("dense", "dense, modules", "predictor", "predictor, strict")
PROMPTS = ["The history of the Roman Empire", "def quicksort(arr):", "Photosynthesis is the process",
           "In a small village by the sea,"]


def run_config(model: str, profile: str, config: str, seqs: int, tokens: int, hot_fraction: float) -> dict:
    """In a child process: decode tok/s of `seqs` sequences, and the greedy tokens of PROMPTS."""
    from flashserve import LLM, SamplingParams
    from flashserve.offload.hot_cold import HotColdMLP

    kw = {}
    if config.startswith("predictor"):
        kw = dict(hot_neuron_profile=profile, neuron_predictor=True, hot_neuron_fraction=hot_fraction,
                  neuron_predictor_max_disagreement=1.0 if config == "predictor" else 0.0)
    llm = LLM(model=model, dtype="float32", quantization="none", max_model_len=512, max_num_seqs=max(seqs, 4),
              enable_prefix_caching=False, kv_cache_memory=128 << 20, **kw)
    eng = llm.engine
    if config == "dense, modules":
        eng.runner.decode_plan = None
    mlps = [layer.mlp for layer in eng.runner.model.model.layers if isinstance(layer.mlp, HotColdMLP)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    greedy = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]

    for m in mlps:
        m.cold_computed = m.steps = 0
    prompts = [[100 + 7 * i + j for j in range(16)] for i in range(seqs)]
    tok_s = decode_tok_s(eng, prompts, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    cold = sum(m.cold_computed for m in mlps) / max(1, sum(m.steps * m.num_cold for m in mlps)) if mlps else None
    return {"tok_s": tok_s, "greedy": greedy, "predictor_on": bool(mlps),
            "cold_computed": cold}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default=None, help="a profile with a predictor (default: written to hot_neurons.pt "
                                                    "with flashserve profile-neurons --predictor-rank 32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--hot-fraction", type=float, default=0.2)
    ap.add_argument("--seqs", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        config, seqs = json.loads(a.child)
        print(json.dumps(run_config(a.model, a.profile, config, seqs, a.tokens, a.hot_fraction)))
        return
    from flashserve.offload.neuron_profile import NeuronProfile

    if a.profile is None:
        a.profile = "hot_neurons.pt"
        subprocess.run([sys.executable, "-m", "flashserve.entrypoints.cli", "profile-neurons", "--model", a.model,
                        "--out", a.profile, "--predictor-rank", "32"], check=True, capture_output=True)
    profile = NeuronProfile.load(a.profile)
    p = profile.predictor
    print(f"model {a.model}, profile {a.profile} ({profile.num_tokens} calibration tokens), hot fraction "
          f"{a.hot_fraction}, {a.tokens} tokens per sequence, float32")
    print(profile.table())
    print(f"predictor rank {p['rank']}, cutoff for {p['target_recall']} training recall: held-out recall per layer "
          + " ".join(f"{r:.3f}" for r in p["recall"]) + f"; predicted active {p['predicted_active'].mean():.3f}")

    seq_list = [int(s) for s in a.seqs.split(",")]
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(a.rounds):
        for config in CONFIGS:
            for seqs in seq_list:
                out = subprocess.run([sys.executable, __file__, "--model", a.model, "--profile", a.profile,
                                      "--tokens", str(a.tokens), "--hot-fraction", str(a.hot_fraction),
                                      "--child", json.dumps([config, seqs])], capture_output=True, text=True, check=True)
                results.setdefault((config, seqs), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    from flashserve.offload.hot_cold import agreement

    reference = results[("dense", seq_list[0])][0]["greedy"]
    print(f"| config | seqs | predictor on | cold computed | greedy agreement | decode tok/s (median, min-max of "
          f"{a.rounds}) |")
    print("|---|---|---|---|---|---|")
    for (config, seqs), runs in results.items():
        tps = [r["tok_s"] for r in runs]
        cold = runs[0]["cold_computed"]
        print(f"| {config} | {seqs} | {'yes' if runs[0]['predictor_on'] else 'no'} | "
              f"{'—' if cold is None else f'{cold:.3f}'} | {agreement(reference, runs[0]['greedy']):.3f} | "
              f"{statistics.median(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}) |")


if __name__ == "__main__":
    main()
