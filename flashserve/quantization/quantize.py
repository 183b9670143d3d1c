"""`flashserve quantize`: a float model → a 4-bit GPTQ or AWQ checkpoint in the Hugging Face format
(int4_format.py) that transformers, vLLM and flashserve load.

    rtn      round-to-nearest, asymmetric (AWQ's grid, written in the AWQ format): the baseline
    rtn-sym  round-to-nearest, symmetric (GPTQ's grid, written in the GPTQ format): the baseline
    gptq     gptq.py on each layer's Hessians from the calibration text, each group's grid clipped
             (rtn.fit_clipped_grid) unless --no-clip
    awq      awq.py's scale search on each linear group, then round-to-nearest

The checkpoint is written under a temporary name beside --out and renamed to it at the end, so a
failure leaves nothing behind. The LM head and embeddings stay float16, as in published checkpoints.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flashserve.errors import FlashserveError
from flashserve.quantization import awq, gptq
from flashserve.quantization.calibrate import calibration_ids, load_float_model, walk_layers
from flashserve.quantization.int4_format import Int4Format, Int4Groups, check_group, pack
from flashserve.quantization.rtn import rtn_quantize

METHODS = {"gptq": "gptq", "awq": "awq", "rtn": "awq", "rtn-sym": "gptq"}  # method → checkpoint format
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantizeArgs:
    method: str
    model: str
    out: str
    group_size: int = 128
    calib: str | None = None  # a text file; None: the calibration text below
    act_order: bool = False  # GPTQ's desc_act
    clip: bool | None = None  # GPTQ: each group's grid from rtn.fit_clipped_grid (None: yes); on AWQ's grid it hurt
    seq_len: int = 512
    max_seqs: int = 16
    awq_search_tokens: int = 2048  # calibration rows s_X is averaged over


DEFAULT_CALIB = "/usr/share/common-licenses/GPL-3"  # Debian's licence texts ship with the OS


def quantize_model(args: QuantizeArgs, progress=None) -> dict:
    """Writes the checkpoint to args.out; returns a summary (peak memory, per-layer notes)."""
    if args.method not in METHODS:
        raise FlashserveError(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    if out.exists():
        raise FlashserveError(f"{out} exists; choose a new output path")
    if args.act_order and args.method != "gptq":
        raise FlashserveError("act-order is a GPTQ option")
    if args.clip is not None and args.method != "gptq":
        raise FlashserveError("clip is a GPTQ option")
    from flashserve.model.catalogue import resolve

    model, tokenizer = load_float_model(str(resolve(args.model)))
    for name, module in _linears(model, 0):
        check_group(args.group_size, module.in_features, name)
    ids = None
    if args.method in ("gptq", "awq"):
        calib = args.calib or DEFAULT_CALIB
        try:
            text = Path(calib).read_text(errors="replace")
        except OSError as exc:
            raise FlashserveError(f"{calib}: cannot read the calibration text ({exc.strerror})") from None
        ids = calibration_ids(tokenizer, text, args.seq_len, args.max_seqs, calib)
    fmt = Int4Format(METHODS[args.method], args.group_size, args.act_order)
    packed: dict[str, Int4Groups] = {}
    notes: list[str] = []
    progress = progress or (lambda layers: layers)
    if ids is None:
        for i, _ in enumerate(progress(model.model.layers)):
            for name, module in _linears(model, i):
                packed[name] = _set(module, rtn_quantize(module.weight.data, args.group_size,
                                                         sym=args.method == "rtn-sym"))
    else:
        step = _gptq_layer if args.method == "gptq" else _awq_layer
        walk_layers(model, ids, lambda i, layer, run: step(args, model, i, layer, run, packed, notes), progress)
    _write(model, tokenizer, fmt, packed, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_rss_mib": peak, "calibration_tokens": 0 if ids is None else ids.numel(), "notes": notes}


def _linears(model, i: int) -> list[tuple[str, nn.Linear]]:
    layer = model.model.layers[i]
    return [(f"model.layers.{i}.{name}", layer.get_submodule(name)) for name in _LINEARS]


def _set(module: nn.Linear, g: Int4Groups) -> Int4Groups:
    """The module now computes with the quantized weight (the next layers' calibration inputs see it)."""
    module.weight.data.copy_(torch.from_numpy(g.dequantize()))
    return g


def _input_groups(layer) -> list[tuple[nn.Module | None, list[nn.Linear]]]:
    """(what produces the input, the linears reading it): norms and previous linears, for AWQ's folding.
    o_proj's input is folded into v_proj only when every head has its own v (no grouped-query sharing)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
              (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
              (mlp.up_proj, [mlp.down_proj])]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.insert(1, (attn.v_proj, [attn.o_proj]))
    else:
        groups.insert(1, (None, [attn.o_proj]))
    return groups


class _Captured(Exception):
    """Raised by _capture_inputs's hooks once every input is in: the rest of the layer need not run."""


def _capture_inputs(layer, run, linears: list[nn.Linear], keep) -> dict[nn.Linear, object]:
    """Run the layer once (as far as the last of `linears`), calling keep(x) on the (T, K) input of each."""
    kept, handles = {}, []

    def hook(mod, args, _out):
        kept[mod] = keep(mod, args[0].reshape(-1, mod.in_features), kept)
        if len(kept) == len(linears):
            raise _Captured

    for m in linears:
        handles.append(m.register_forward_hook(hook))
    try:
        run()
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return kept


def _gptq_layer(args, model, i, layer, run, packed, notes) -> None:
    """GPTQ's reference code's true-sequential order: q|k|v, then o, gate|up and down, each group's
    Hessian taken from the layer with the groups before it already quantized, so that it is fitted to
    the inputs the quantized layer gives it (q|k|v and gate|up share one Hessian each)."""
    def keep(mod, x, kept):
        h = kept.get(mod) or gptq.Hessian(mod.in_features)
        h.add(x)
        return h

    names = dict((m, n) for n, m in _linears(model, i))
    for _, linears in _input_groups(layer):
        h = _capture_inputs(layer, run, [linears[0]], keep)[linears[0]].h
        for m in linears:
            packed[names[m]] = _set(m, gptq.gptq_quantize(m.weight.data, h, args.group_size, args.act_order,
                                                          clip=args.clip is not False))


def _awq_layer(args, model, i, layer, run, packed, notes) -> None:
    gen = torch.Generator().manual_seed(i)

    def keep(mod, x, kept):
        rows = torch.randperm(x.shape[0], generator=gen)[: args.awq_search_tokens]
        return x[rows].clone()

    groups = _input_groups(layer)
    inputs = _capture_inputs(layer, run, [linears[0] for _, linears in groups], keep)
    scales = []
    for producer, linears in groups:
        if producer is None:
            scales.append(None)
            continue
        s, alpha, ratio = awq.search_scale(inputs[linears[0]], linears, lambda: run(awq.SEARCH_SEQS),
                                           args.group_size)
        scales.append(s)
        notes.append(f"layer {i} {linears[0].in_features}->{'|'.join(str(m.out_features) for m in linears)}: "
                     f"alpha {alpha:.1f}, layer output error x{ratio:.3f} of alpha 0")
    fold_scales(groups, scales)  # every scale before any rounding
    for name, m in _linears(model, i):
        packed[name] = _set(m, rtn_quantize(m.weight.data, args.group_size, sym=False))


def fold_scales(groups, scales) -> None:
    """AWQ's s per input group (None: left alone) moved into the weights: the linears' columns times s,
    what produces their input (a norm's weight, or the previous linear's rows and bias) divided by it."""
    for (producer, linears), s in zip(groups, scales):
        if s is None:
            continue
        producer.weight.data.div_(s if producer.weight.dim() == 1 else s[:, None])  # norm weight, or rows
        for m in linears:
            m.weight.data.mul_(s)
        if isinstance(producer, nn.Linear) and producer.bias is not None:
            producer.bias.data.div_(s)


def _write(model, tokenizer, fmt: Int4Format, packed: dict[str, Int4Groups], out: Path) -> None:
    from safetensors.torch import save_file

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        tensors = {}
        for name, t in model.state_dict().items():
            module, _, kind = name.rpartition(".")
            if module in packed:
                if kind == "weight":
                    tensors.update({f"{module}.{k}": v for k, v in pack(fmt.method, packed[module]).items()})
                    continue
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            tensors[name] = t.detach().half().contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.update(quantization_config=fmt.config(), torch_dtype="float16", dtype="float16",
                      architectures=[type(model).__name__])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
