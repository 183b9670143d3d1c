"""How often each FFN neuron is active on calibration text: the offline profiling step of PowerInfer
(Song et al. 2023, section 5), run through flashserve's own forward (quantization/calibrate.py).

A gated MLP computes y = D a with a = act(G x) * (U x) (SwiGLU, GeGLU): intermediate neuron j adds
a_j D[:, j] to the layer's output. PowerInfer's models are ReLU-sparse (a_j is exactly zero most of
the time); SiLU and GELU models are not, a_j is almost never zero. So "active" here needs a threshold:
neuron j is active at token t when its contribution's norm

    c_tj = |a_tj| * ||D[:, j]||    exceeds    threshold * max_k c_tk     (the token's largest)

and the profile also records what that definition costs: per layer, the mean over tokens of
||sum_{j inactive} a_tj D[:, j]|| / ||y_t|| (the relative error of skipping every inactive neuron),
so a sparsity figure never stands without the error it would bring.

    NeuronProfile.active_counts   (layers, I) int64   tokens at which each neuron was active
    NeuronProfile.sparsity        (layers,)   float   mean fraction of neurons inactive per token
    NeuronProfile.dropped_error   (layers,)   float   mean relative error of dropping them
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashserve.errors import FlashserveError

PROFILE_FORMAT = 1
DEFAULT_THRESHOLD = 0.01  # of the token's largest contribution
PROFILE_SEQ_LEN = 512
PROFILE_SEQS = 4
CHECK_PROMPTS = 3  # token runs spread over the calibration text, kept as greedy prompts for the exactness check
CHECK_PROMPT_LEN = 8


@dataclass
class NeuronProfile:
    architecture: str
    threshold: float
    num_tokens: int
    active_counts: torch.Tensor  # (layers, I) int64
    sparsity: torch.Tensor  # (layers,) float64
    dropped_error: torch.Tensor  # (layers,) float64
    check_prompts: list = field(default_factory=list)  # a few calibration token runs, for hot_cold's exactness check
    predictor: dict | None = None  # offload/neuron_predictor.py's trained weights, when trained
    meta: dict = field(default_factory=dict)  # e.g. the model and calibration text it came from

    @property
    def num_layers(self) -> int:
        return self.active_counts.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.active_counts.shape[1]

    def save(self, path: str | Path) -> None:
        torch.save({"format": PROFILE_FORMAT, **self.__dict__}, path)

    @classmethod
    def load(cls, path: str | Path) -> NeuronProfile:
        try:
            state = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise FlashserveError(f"{path}: no such neuron profile (flashserve profile-neurons writes one)") from None
        except Exception as exc:  # a file that is not a torch archive of plain tensors
            raise FlashserveError(f"{path}: not a neuron profile ({exc})") from None
        if not isinstance(state, dict) or state.pop("format", None) != PROFILE_FORMAT:
            raise FlashserveError(f"{path}: not a neuron profile of format {PROFILE_FORMAT}")
        return cls(**state)

    def table(self) -> str:
        """One line per layer: sparsity, the error of dropping the inactive neurons, and how many
        neurons are active at least half the time."""
        lines = [f"threshold {self.threshold} of the token's largest contribution, {self.num_tokens} tokens",
                 "layer  inactive/token  drop error  neurons active >=50%"]
        half = (self.active_counts >= self.num_tokens / 2).sum(1)
        for i in range(self.num_layers):
            lines.append(f"{i:5d}  {self.sparsity[i]:14.3f}  {self.dropped_error[i]:10.4f}  "
                         f"{int(half[i]):6d} of {self.intermediate_size}")
        lines.append(f"  all  {self.sparsity.mean():14.3f}  {self.dropped_error.mean():10.4f}")
        return "\n".join(lines)


def activity(a: torch.Tensor, down_norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """(T, I) bool: c_tj = |a_tj| ||D[:, j]|| above threshold * max_k c_tk. a: (T, I), down_norms: (I,)."""
    c = a.abs() * down_norms  # (T, I)
    return c > threshold * c.amax(1, keepdim=True)


def gated_mlps(model) -> list:
    """Each decoder layer's gated MLP (the module holding gate_up_proj and down_proj)."""
    return [layer.mlp for layer in model.model.layers]


def down_weight(mlp) -> torch.Tensor:
    """The float down projection (d, I); the profile needs per-column norms of float weights."""
    if mlp.down_proj.qweight is not None:
        raise FlashserveError("neuron profiling reads float MLP weights: load the model with quantization='none'")
    return mlp.down_proj.weight


@torch.inference_mode()
def profile_neurons(model, cfg, ids: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                    keep_samples: bool = False) -> tuple[NeuronProfile, list | None]:
    """Profile `model` (flashserve's, float MLP weights) on the calibration sequences ids (S, L).
    With keep_samples, also per layer (x (N, d) float32, active (N, I) bool): the MLP inputs and
    activity masks a predictor is trained on."""
    from flashserve.quantization.calibrate import engine_prefill, own_kv_cache

    if not 0.0 <= threshold < 1.0:
        raise FlashserveError(f"the activity threshold is a fraction of a token's largest contribution, "
                              f"in [0, 1); got {threshold}")
    mlps = gated_mlps(model)
    norms = [down_weight(m).float().norm(dim=0) for m in mlps]  # (I,) each
    n_layers, size = len(mlps), norms[0].numel()
    counts = torch.zeros(n_layers, size, dtype=torch.int64)
    inactive = torch.zeros(n_layers, dtype=torch.float64)
    error = torch.zeros(n_layers, dtype=torch.float64)
    inputs: list[list] = [[] for _ in mlps]
    masks: list[list] = [[] for _ in mlps]

    def before_mlp(i):
        def hook(_module, args):
            if keep_samples:
                inputs[i].append(args[0].float().clone())
        return hook

    def before_down(i):
        def hook(module, args):
            a = args[0].float()  # (T, I)
            active = activity(a, norms[i], threshold)
            counts[i] += active.sum(0)
            inactive[i] += (~active).float().mean(1).sum().double()
            w = module.weight.float()  # (d, I)
            dropped = (a * ~active) @ w.T  # (T, d)
            error[i] += (dropped.norm(dim=1) / (a @ w.T).norm(dim=1).clamp_min(1e-30)).sum().double()
            if keep_samples:
                masks[i].append(active)
        return hook

    handles = [h for i, m in enumerate(mlps) for h in (m.register_forward_pre_hook(before_mlp(i)),
                                                        m.down_proj.register_forward_pre_hook(before_down(i)))]
    try:
        with own_kv_cache(model, cfg, ids.shape[1]):
            for seq in ids.tolist():
                engine_prefill(model, seq)
    finally:
        for h in handles:
            h.remove()
    tokens = ids.numel()
    flat = ids.reshape(-1).tolist()
    stride = max(1, len(flat) // CHECK_PROMPTS)
    prompts = [flat[k * stride: k * stride + CHECK_PROMPT_LEN] for k in range(min(CHECK_PROMPTS, len(flat)))]
    profile = NeuronProfile(cfg.architecture, threshold, tokens, counts, inactive / tokens, error / tokens, prompts)
    samples = [(torch.cat(x), torch.cat(m)) for x, m in zip(inputs, masks)] if keep_samples else None
    return profile, samples


def profile_model(model_path: str, calibration_text: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                  seq_len: int = PROFILE_SEQ_LEN, max_seqs: int = PROFILE_SEQS,
                  predictor_rank: int | None = None, target_recall: float | None = None) -> NeuronProfile:
    """Load the model (float32, weights dequantized), profile it on the calibration text (default: the
    one SmoothQuant calibrates on), and with predictor_rank train the activity predictors too (their
    cutoffs for target_recall, default neuron_predictor.TARGET_RECALL)."""
    from flashserve.model.loader import load_model
    from flashserve.quantization.activation_methods import DEFAULT_CALIBRATION_TEXT, calibration_tokens
    from flashserve.quantization.calibrate import cut_sequences

    model, cfg = load_model(model_path, dtype=torch.float32, quantization="none")
    ids = cut_sequences(calibration_tokens(model_path, calibration_text), min(seq_len, cfg.max_position_embeddings),
                        max_seqs, calibration_text or DEFAULT_CALIBRATION_TEXT)
    profile, samples = profile_neurons(model, cfg, ids, threshold, keep_samples=predictor_rank is not None)
    profile.meta = {"model": str(model_path), "calibration_text": calibration_text or DEFAULT_CALIBRATION_TEXT}
    if predictor_rank is not None:
        from flashserve.offload.neuron_predictor import TARGET_RECALL, train_predictors

        profile.predictor = train_predictors(samples, predictor_rank, target_recall=target_recall or TARGET_RECALL)
    return profile
