"""What `quantize --method gguf` reads: a GGUF file, or a Hugging Face directory (config.json,
*.safetensors, tokenizer.json) converted on the way, as llama.cpp's convert_hf_to_gguf.py lays it out.

Either source gives the GGUF architecture, a way to write its key/value metadata, and its tensors as
(GGUF name, read → float32 array, rows = output features), read one at a time when asked for.

From an HF directory (Llama/Mistral and Qwen2 families; byte-level BPE tokenizers):
    hyper-parameters   {arch}.context_length, embedding_length, block_count, ... from config.json
                       (flashserve's own reading of it, model/loader/hf.py)
    RoPE scaling       llama3 → the rope_freqs tensor of per-frequency divisors; linear → rope.scaling.*
    tensors            llama.cpp's names; Llama's Q/K rows interleaved per head (the layout its RoPE
                       expects); a head tied to the embedding written once, as token_embd
    tokenizer          tokenizer.ggml.model "gpt2": tokens by id (ids the vocabulary lacks up to the
                       embedding's rows as [PAD<i>], type UNUSED), types (added special tokens CONTROL,
                       other added ones USER_DEFINED, the rest NORMAL), merges, special token ids,
                       add_bos and the chat template (gguf-py's SpecialVocab, the converter's helper)
    pre-tokenizer      llama.cpp names it by hashing the tokenizer's output on a test text; here it is
                       recognised from tokenizer.json's pre-tokenizer for the families above, and left
                       out otherwise (llama.cpp then warns and uses its default)
Gemma 3 (SentencePiece vocabulary, (1 + w) norms) and other tokenizer models are refused.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashserve.errors import FlashserveError

_NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type")  # the writer sets these
_HF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_HF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
# tokenizer.json pre-tokenizers → llama.cpp's tokenizer.ggml.pre (the regexes of its llama-vocab.cpp)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


@dataclass
class GGUFSource:
    arch: str
    tensors: list[tuple[str, Callable[[], np.ndarray]]]
    write_metadata: Callable  # (GGUFWriter) -> None
    notes: list[str] = field(default_factory=list)


def open_source(path: Path) -> GGUFSource:
    return _hf_source(path) if path.is_dir() else _gguf_source(path)


def _gguf_source(path: Path) -> GGUFSource:
    from gguf import GGUFReader, GGUFValueType

    from flashserve.model.loader.gguf import dequantize_tensor

    if path.suffix != ".gguf":
        raise FlashserveError(f"{path}: --method gguf reads a .gguf file or a Hugging Face directory")
    reader = GGUFReader(str(path))

    def write_metadata(writer) -> None:
        for key, f in reader.fields.items():
            if not key.startswith(_NOT_COPIED):
                vtype = f.types[0]
                writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY
                                     else None)

    return GGUFSource(reader.fields["general.architecture"].contents(),
                      [(t.name, lambda t=t: dequantize_tensor(t)) for t in reader.tensors], write_metadata)


def _hf_source(path: Path) -> GGUFSource:
    from safetensors import safe_open

    from flashserve.model.loader.hf import hf_model_config, is_int4_checkpoint

    cfg = hf_model_config(str(path))
    if cfg.architecture not in ("llama", "qwen2"):
        raise FlashserveError(f"{path}: converting a {cfg.architecture} directory to GGUF is not supported "
                              "(Llama, Mistral and Qwen2 families are)")
    if is_int4_checkpoint(str(path)):
        raise FlashserveError(f"{path}: a GPTQ/AWQ checkpoint is already quantized; start from float weights")
    tensors: list[tuple[str, Callable[[], np.ndarray]]] = []
    embedding_rows = None
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for hf_name in h.keys():
                name = _gguf_name(hf_name)
                if name is None:
                    raise FlashserveError(f"{f}: tensor {hf_name!r} has no GGUF counterpart in a "
                                          f"{cfg.architecture} model")
                if name == "output.weight" and cfg.tie_word_embeddings:
                    continue  # the tied head is token_embd itself
                if name == "token_embd.weight":
                    embedding_rows = h.get_slice(hf_name).get_shape()[0]
                heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(name.split(".")[-2])
                tensors.append((name, lambda f=f, n=hf_name, heads=heads: _read(f, n, heads, cfg.architecture)))
    if embedding_rows is None:
        raise FlashserveError(f"{path}: no model.embed_tokens.weight in its *.safetensors files")
    freqs = _rope_freqs(cfg)
    if freqs is not None:
        tensors.insert(0, ("rope_freqs.weight", lambda: freqs))
    notes: list[str] = []
    vocab = _vocab(path, embedding_rows, notes)

    def write_metadata(writer) -> None:
        _write_hparams(writer, cfg, path.name, embedding_rows)
        vocab(writer)

    return GGUFSource(cfg.architecture, tensors, write_metadata, notes)


def _gguf_name(hf_name: str) -> str | None:
    if hf_name in _HF_GLOBAL:
        return _HF_GLOBAL[hf_name]
    parts = hf_name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    module, kind = ".".join(parts[3:-1]), parts[-1]
    return f"blk.{parts[2]}.{_HF_LAYER[module]}.{kind}" if module in _HF_LAYER else None


def _read(file: Path, hf_name: str, heads: int | None, arch: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as h:
        w = h.get_tensor(hf_name).float().numpy()
    if heads is not None and arch == "llama":  # interleave each head's two RoPE halves, row by row
        w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return np.ascontiguousarray(w)


def _rope_freqs(cfg) -> np.ndarray | None:
    """Llama 3.1's scaling as llama.cpp carries it: per-frequency divisors of the base frequencies."""
    import torch

    from flashserve.model.layers.rotary import inverse_frequencies

    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if kind in (None, "default", "linear"):
        return None
    if kind != "llama3":
        raise FlashserveError(f"RoPE scaling {kind!r} is not converted to GGUF (llama3 and linear are)")
    base = inverse_frequencies(cfg.head_dim, cfg.rope_theta, None)
    return (base / inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)).to(torch.float32).numpy()


def _write_hparams(writer, cfg, name: str, vocab_rows: int) -> None:
    a = cfg.architecture
    writer.add_name(name)
    for key, value in (("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_layers), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_heads), ("attention.head_count_kv", cfg.num_kv_heads),
                       ("rope.dimension_count", cfg.head_dim), ("vocab_size", vocab_rows)):
        writer.add_uint32(f"{a}.{key}", int(value))
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        writer.add_uint32(f"{a}.attention.key_length", cfg.head_dim)
        writer.add_uint32(f"{a}.attention.value_length", cfg.head_dim)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    writer.add_float32(f"{a}.rope.freq_base", cfg.rope_theta)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_string(f"{a}.rope.scaling.type", "linear")
        writer.add_float32(f"{a}.rope.scaling.factor", float(scaling["factor"]))
    writer.add_quantization_version(2)


def _vocab(path: Path, rows: int, notes: list[str]) -> Callable:
    """The tokenizer's GGUF keys, checked now (before any tensor is quantized), written when called."""
    from gguf.vocab import SpecialVocab

    try:
        tok = json.loads((path / "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FlashserveError(f"{path}/tokenizer.json: unreadable ({exc})") from None
    model = tok.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(tok.get("pre_tokenizer")):
        raise FlashserveError(f"{path}: only byte-level BPE tokenizers (GPT-2 style) are converted to GGUF; "
                              f"this one is {model.get('type')!r}")
    ids = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    ids.update({t["content"]: i for i, t in added.items()})
    if max(ids.values()) >= rows:
        raise FlashserveError(f"{path}: the tokenizer has ids up to {max(ids.values())}, the embedding {rows} rows")
    tokens, types = [f"[PAD{i}]" for i in range(rows)], [_TOKEN_UNUSED] * rows
    for text, i in ids.items():
        tokens[i] = text
        types[i] = _TOKEN_NORMAL if i not in added else (_TOKEN_CONTROL if added[i].get("special")
                                                          else _TOKEN_USER_DEFINED)
    special = SpecialVocab(path, load_merges=True, n_vocab=rows)
    pre = _pre_tokenizer(tok.get("pre_tokenizer"))
    if pre is None:
        notes.append("tokenizer.json's pre-tokenizer is not one flashserve recognises: tokenizer.ggml.pre left "
                     "out (llama.cpp warns and splits text with its default)")
    add_bos = special.add_special_token.get("bos", _template_adds_bos(tok.get("post_processor")))

    def write(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)
        if "bos" not in special.add_special_token:
            writer.add_add_bos_token(add_bos)

    return write


def _byte_level(pre: dict | None) -> bool:
    steps = (pre or {}).get("pretokenizers", [pre]) if pre else []
    return any(s.get("type") == "ByteLevel" for s in steps)


def _pre_tokenizer(pre: dict | None) -> str | None:
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # one digit at a time, then GPT-2's regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def _template_adds_bos(post: dict | None) -> bool:
    """Whether tokenizer.json's post-processor puts a special token before a single sequence."""
    steps = (post or {}).get("processors", [post]) if post else []
    single = next((s.get("single", []) for s in steps if s.get("type") == "TemplateProcessing"), [])
    return bool(single) and "SpecialToken" in single[0]
