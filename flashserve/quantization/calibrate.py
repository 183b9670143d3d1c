"""The float model a 4-bit method starts from, its calibration tokens, and a walk over its decoder
layers that hands each layer's inputs to the method and carries its (quantized) outputs on.

The float model is transformers' own class for the architecture (Llama/SmolLM2/Qwen2), filled from an
HF directory or from a GGUF file dequantized (loader/gguf.py gives HF names and layouts): the method
rewrites its nn.Linear weights in place, so the model after quantization is also the float reference
of what was written (the dequantized checkpoint).

GPTQ (section 5) and AWQ (section 3.3) quantize one layer at a time: the calibration sequences run
through layers 0..i-1 already quantized, so layer i is fitted to the inputs it will really see.

SmoothQuant, applied when flashserve loads a model, takes its activation maxima from flashserve's own
model instead (engine_input_maxima), on the same calibration tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flashserve.errors import FlashserveError, ModelFormatError

ARCHITECTURES = ("llama", "qwen2")  # the HF model types with q|k|v and gate|up linears read from one norm


def load_float_model(path: str):
    """(transformers model in float32, its HF tokenizer) from an HF directory or a GGUF file."""
    import transformers as tf

    p = Path(path)
    if p.is_dir():
        config = tf.AutoConfig.from_pretrained(p)
        if getattr(config, "quantization_config", None):
            raise ModelFormatError(f"{path}: already quantized ({config.quantization_config.get('quant_method')})")
        _check_architecture(config.model_type, path)
        model = tf.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
        return model.eval(), tf.AutoTokenizer.from_pretrained(p)
    from flashserve.model.loader.gguf import gguf_model_config, iter_gguf_tensors
    from flashserve.tokenizer.tokenizer import _build_hf

    cfg = gguf_model_config(path)
    _check_architecture(cfg.architecture, path)
    if cfg.rope_scaling is not None:
        raise ModelFormatError(f"{path}: rope scaling {cfg.rope_scaling.get('rope_type')} is not carried into "
                               "an HF config by flashserve quantize")
    config = tf.AutoConfig.for_model(
        cfg.architecture, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings, hidden_act=cfg.hidden_act,
        attention_bias=cfg.attention_bias, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else next(iter(cfg.eos_token_ids), None))
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dict(iter_gguf_tensors(path, cfg))
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval(), _build_hf(p)


def _check_architecture(arch: str, path: str) -> None:
    if arch not in ARCHITECTURES:
        raise ModelFormatError(f"{path}: architecture {arch!r} is not supported by flashserve quantize "
                               f"(supported: {', '.join(ARCHITECTURES)})")


def calibration_ids(tokenizer, text: str, seq_len: int, max_seqs: int, where: str) -> torch.Tensor:
    """The text's tokens cut into up to `max_seqs` sequences of `seq_len` (one shorter sequence when the
    text is shorter): (S, L) int64."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
    return cut_sequences(ids, seq_len, max_seqs, where)


def cut_sequences(ids: list[int], seq_len: int, max_seqs: int, where: str) -> torch.Tensor:
    """Token ids cut as calibration_ids cuts them."""
    if len(ids) < 2:
        raise FlashserveError(f"{where}: the calibration text is empty (it needs at least 2 tokens)")
    length = min(seq_len, len(ids))
    count = min(max_seqs, len(ids) // length)
    return torch.tensor(ids[: count * length]).view(count, length)


class _Stop(Exception):
    pass


@torch.no_grad()
def walk_layers(model, ids: torch.Tensor, quantize_layer: Callable[[int, nn.Module, Callable], None],
                progress) -> None:
    """For each decoder layer i: quantize_layer(i, layer, run), where run() runs the layer on its
    calibration inputs (the outputs of the layers before it, as quantized) and returns the outputs
    (run(seqs) on the first `seqs` sequences only);
    after quantize_layer the outputs of the quantized layer become the next layer's inputs."""
    layers = model.model.layers
    captured: dict = {}

    def catch(_module, args, kwargs):
        captured["hidden"], captured["kwargs"] = args[0] if args else kwargs.pop("hidden_states"), kwargs
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(ids, use_cache=False)  # a KV cache would make run()'s second call attend to its first call's keys
    except _Stop:
        pass
    finally:
        handle.remove()
    hidden, kwargs = captured["hidden"], captured["kwargs"]

    for i, layer in enumerate(progress(layers)):
        def run(seqs: int | None = None, layer=layer, hidden=hidden):
            """The layer on its inputs: all of them, or the first `seqs` sequences (whose positions and
            causal mask are those of any sequence, as the calibration sequences share one length)."""
            out = layer(hidden if seqs is None else hidden[:seqs], **kwargs)
            return out[0] if isinstance(out, tuple) else out

        quantize_layer(i, layer, run)
        hidden = run()


@torch.inference_mode()
def engine_input_maxima(model, cfg, ids: torch.Tensor, linears: list[nn.Module], block_size: int = 16) -> dict:
    """max_t |x_tk| (K,) float32 of the input of each module in `linears`, over the calibration
    sequences ids (S, L) prefilled one at a time by flashserve's own model (engine_prefill)."""
    maxima: dict = {}

    def record(module, args):
        x = args[0].reshape(-1, module.in_features).abs().amax(0).float()  # (K,)
        maxima[module] = torch.maximum(maxima[module], x) if module in maxima else x

    handles = [m.register_forward_pre_hook(record) for m in linears]
    try:
        with own_kv_cache(model, cfg, ids.shape[1], block_size):
            for seq in ids.tolist():
                engine_prefill(model, seq, block_size)
    finally:
        for h in handles:
            h.remove()
    return maxima


@contextmanager
def own_kv_cache(model, cfg, max_tokens: int, block_size: int = 16):
    """Bind a KV cache of its own holding one sequence of up to `max_tokens` to flashserve's model for
    the duration (released afterwards: the runner binds the engine's)."""
    from flashserve.model.layers.attention import Attention
    from flashserve.runner.kv_cache import allocate_kv_caches

    blocks = -(-max_tokens // block_size)
    model.bind_kv_caches(allocate_kv_caches(cfg, blocks + 1, block_size, model.dtype, torch.device("cpu"), "auto"))
    try:
        yield
    finally:
        for m in model.modules():
            if isinstance(m, Attention):
                m.kv_cache = None


@torch.inference_mode()
def engine_prefill(model, seq: list[int], block_size: int = 16) -> torch.Tensor:
    """Hidden states (L, d) after the final norm of one whole sequence prefilled by flashserve's own
    model, inside own_kv_cache (block 0 is left as the pad block)."""
    from flashserve.core.sched_output import ScheduledRequest
    from flashserve.runner.input_batch import build_model_inputs

    blocks = list(range(1, -(-len(seq) // block_size) + 1))
    req = ScheduledRequest("calibration", seq, 0, len(seq), blocks, None, [])
    inputs = build_model_inputs([req], block_size, torch.device("cpu"))
    return model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
