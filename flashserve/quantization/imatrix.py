"""`flashserve imatrix`: the importance matrix of a model's linear weights from calibration text.

For every linear weight, the mean over calibration tokens of the squared input activation of each
input column, E_t[x_tk^2] (K,): llama.cpp's importance matrix. The error a weight change dW adds to
a layer's output on input x is dW x; its expected square over tokens is sum_k dW_k^2 E[x_k^2] when
inputs are uncorrelated across columns, so these are the weights of the quantization error that
gguf_encode.py minimises.

The activations come from flashserve's own model prefilling the calibration sequences in float32
(calibrate.py): a GGUF file's weights packed as the engine runs them with float activations (exact but
Q6_K's, requantized to 8 bits in linears; a dequantized float32 copy of Qwen2.5-Coder-1.5B peaked at
8.9 GiB), an HF directory's float weights as read. The importance of fused projections (q|k|v,
gate|up) is that of their shared input, stored under each part's name.

File format (safetensors, the default): one float32 (K,) tensor per weight, named as the GGUF tensor it
weighs ("blk.0.attn_q.weight", "output.weight", or "token_embd.weight" for a head tied to the
embedding); metadata {"format": "flashserve-imatrix", "tokens": <calibration tokens>, "calibration":
<file>}. llama.cpp's imatrix GGUF and legacy .dat are written and read too (llama_imatrix.py), so a
matrix made here serves llama-quantize and one made by llama-imatrix serves `flashserve quantize`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flashserve.errors import FlashserveError

FORMAT = "flashserve-imatrix"
SEQ_LEN = 512
MAX_SEQS = 32  # 16k tokens of calibration at most
# flashserve module (below a decoder layer) → the GGUF tensors it holds
_GGUF_PARTS = {
    "self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "self_attn.o_proj": ("attn_output",),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
    "mlp.down_proj": ("ffn_down",),
}


def compute_imatrix(model_path: str, calib: str, seq_len: int = SEQ_LEN, max_seqs: int = MAX_SEQS,
                    progress=None) -> tuple[dict[str, np.ndarray], int, int]:
    """({GGUF weight name: E[x^2] (K,) float32}, calibration tokens, tokens per sequence) for the
    model at `model_path`."""
    from flashserve.model.catalogue import resolve
    from flashserve.model.loader import load_model
    from flashserve.quantization.activation_methods import calibration_tokens
    from flashserve.quantization.calibrate import cut_sequences, engine_prefill, own_kv_cache

    model_path = str(resolve(model_path))
    packed = "weight-only" if model_path.endswith(".gguf") else "none"
    model, cfg = load_model(model_path, torch.float32, quantization=packed)
    ids = cut_sequences(calibration_tokens(model_path, calib), min(seq_len, cfg.max_position_embeddings),
                        max_seqs, calib)
    sums: dict[tuple[str, ...], torch.Tensor] = {}  # GGUF names sharing one input → sum_t x_t^2 (K,)

    def add(names: tuple[str, ...], x: torch.Tensor) -> None:
        sq = x.reshape(-1, x.shape[-1]).double().square().sum(0)
        sums[names] = sums[names] + sq if names in sums else sq

    handles = []
    for i, layer in enumerate(model.model.layers):
        for sub, parts in _GGUF_PARTS.items():
            handles.append(layer.get_submodule(sub).register_forward_pre_hook(
                lambda _m, args, key=tuple(f"blk.{i}.{p}.weight" for p in parts): add(key, args[0])))
    head = ("token_embd.weight",) if model.lm_head is None else ("output.weight",)
    try:
        with own_kv_cache(model, cfg, ids.shape[1]):
            for seq in (progress or (lambda s: s))(ids.tolist()):
                add(head, engine_prefill(model, seq))  # the head reads the final hidden states
    finally:
        for h in handles:
            h.remove()
    tokens = ids.numel()
    means = {name: (total / tokens).float().numpy() for names, total in sums.items() for name in names}
    return means, tokens, ids.shape[1]


def save_imatrix(path: str, imatrix: dict[str, np.ndarray], tokens: int, calib: str,
                 chunk_size: int = SEQ_LEN) -> None:
    """Writes by the suffix: .gguf → llama.cpp's imatrix GGUF, .dat → its legacy binary (both for
    llama-quantize --imatrix; llama_imatrix.py), anything else → flashserve's safetensors.
    chunk_size: the tokens per calibration sequence (llama.cpp's chunk)."""
    from safetensors.numpy import save_file

    from flashserve.quantization import llama_imatrix

    out = Path(path)
    if out.exists():
        raise FlashserveError(f"{out} exists; choose a new output path")
    tmp = out.parent / f".{out.name}.partial"
    try:
        if out.suffix in (".gguf", ".dat"):
            write = llama_imatrix.write_gguf if out.suffix == ".gguf" else llama_imatrix.write_dat
            write(tmp, imatrix, tokens, chunk_size, Path(calib).name)
        else:
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}, str(tmp),
                      metadata={"format": FORMAT, "tokens": str(tokens), "calibration": Path(calib).name})
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)


def load_imatrix(path: str) -> dict[str, np.ndarray]:
    """{weight name: per-column importance (K,) float32} from any of the three formats, told apart by
    their first bytes: "GGUF" (llama.cpp's GGUF), a little-endian header length and "{" (safetensors),
    otherwise llama.cpp's legacy .dat, which has no magic and is checked entry by entry."""
    from flashserve.quantization import llama_imatrix

    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if head[:4] == llama_imatrix.GGUF_MAGIC:
                return llama_imatrix.read_gguf(path)
            if head[8:9] == b"{":
                return _load_safetensors(path)
            f.seek(0)
            data = f.read()
    except OSError as exc:
        raise FlashserveError(f"{path}: cannot read the importance matrix ({exc.strerror})") from None
    except llama_imatrix.ImatrixFormatError as exc:
        raise FlashserveError(f"{path}: cannot read the importance matrix: {exc}") from None
    try:
        return llama_imatrix.read_dat(data)
    except llama_imatrix.ImatrixFormatError as exc:
        raise FlashserveError(f"{path}: cannot read the importance matrix: no GGUF or safetensors header, "
                              f"and not llama.cpp's legacy .dat either ({exc})") from None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        f = safe_open(path, "np")
    except Exception as exc:  # not safetensors after all (safetensors raises its own type)
        raise FlashserveError(f"{path}: cannot read the importance matrix ({exc})") from None
    with f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise FlashserveError(f"{path}: a safetensors file, but not an importance matrix written by "
                                  "`flashserve imatrix`")
        return {k: f.get_tensor(k) for k in f.keys()}
