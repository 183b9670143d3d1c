"""AWQ variants and a per-linear ablation of 4-bit rounding, fake-quantized in a transformers model
(issue 17: why AWQ closes only 15% of round-to-nearest's gap on Qwen2.5-Coder-0.5B).

The model, calibration sequences, layer walk and AWQ's scale folding are `flashserve quantize`'s
(quantization/quantize.py, awq.py); instead of writing a checkpoint, each layer's weights are replaced
by their dequantized 4-bit values in place, and perplexity is taken by transformers on held-out chunks
(the same chunks as benchmarks/quantization.py: Apache-2.0 + MPL-2.0, 512 tokens each).

    python benchmarks/awq_variants.py --variant rtn            # check: the table's rtn g128 row
    python benchmarks/awq_variants.py --variant awq-duo        # AutoAWQ's scale: mean|x|^a / mean|w~|^(1-a)
    python benchmarks/awq_variants.py --variant rtn-clip       # AutoAWQ's clipping search, q and k exempt
    python benchmarks/awq_variants.py --variant rtn-clip-keep-down   # the same, down_proj exempt too
    python benchmarks/awq_variants.py --variant rtn --only mlp.gate_proj   # round one kind of linear only

awq-duo: s = mean_t |x_tk|^alpha / (mean_n |w_nk| / max over its group)^(1 - alpha), the weight term
AutoAWQ adds to the paper's activation-only s; scored by the layer's output as awq.py scores.
Clipping: per output row and group, the range [-m, m] with m = max|w| (1 - i/20), i < 10, whose
rounded group gives the least squared error of x_g . w_g over 512 calibration tokens (AutoAWQ's
auto_clip), applied before rounding.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from flashserve.model.catalogue import resolve
from flashserve.quantization import awq
from flashserve.quantization import quantize as Q
from flashserve.quantization.calibrate import calibration_ids, load_float_model, walk_layers
from flashserve.quantization.rtn import fake_quantize, fit_grid, round_on_grid, rtn_quantize
from flashserve.tokenizer.tokenizer import Tokenizer

HELDOUT = ("/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0")
VARIANTS = ("rtn", "awq", "awq-duo", "rtn-clip", "rtn-clip-keep-down")


@torch.no_grad()
def duo_scale(x, linears, run, group):
    """awq.search_scale with AutoAWQ's weight term in s."""
    x_mean = x.float().abs().mean(0).clamp_min(1e-8)
    w = torch.cat([m.weight.data for m in linears]).float().abs()
    n, k = w.shape
    wg = w.view(n, k // group, group)
    w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).view(n, k).mean(0)
    originals = [m.weight.data.clone() for m in linears]
    ref, best = run(), (float("inf"), None)
    for step in range(awq.GRID):
        alpha = step / awq.GRID
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for m, w0 in zip(linears, originals):
            m.weight.data.copy_(fake_quantize(w0 * s, group, sym=False) / s)
        err = (run() - ref).float().pow(2).mean().item()
        if err < best[0]:
            best = (err, s)
    for m, w0 in zip(linears, originals):
        m.weight.data.copy_(w0)
    return best[1], 0.0, 0.0


@torch.no_grad()
def clipped(w, x, group, grid=20, max_shrink=0.5, rows_per_pass=64):
    """w (N, K) with each (row, group) clamped to the range whose rounding errs least on x (T, K)."""
    n, k = w.shape
    xg, wg = x.float().view(-1, k // group, group), w.float().view(n, k // group, group)
    best_max = torch.empty(n, k // group)
    for r0 in range(0, n, rows_per_pass):
        wb = wg[r0:r0 + rows_per_pass]
        org_max = wb.abs().amax(-1, keepdim=True)
        ref = torch.einsum("tgi,bgi->tbg", xg, wb)
        best_err, bm = torch.full(org_max.shape[:2], float("inf")), org_max[..., 0].clone()
        for i in range(int(max_shrink * grid)):
            top = org_max * (1 - i / grid)
            cw = torch.clamp(wb, -top, top)
            err = (torch.einsum("tgi,bgi->tbg", xg, round_on_grid(cw, *fit_grid(cw, sym=False))) - ref).pow(2).mean(0)
            better = err < best_err
            best_err, bm = torch.where(better, err, best_err), torch.where(better, top[..., 0], bm)
        best_max[r0:r0 + rows_per_pass] = bm
    return torch.clamp(wg, -best_max[..., None], best_max[..., None]).view(n, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--variant", choices=VARIANTS, default="rtn")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", default=Q.DEFAULT_CALIB)
    ap.add_argument("--only", default="", help="round only the linears whose name holds this (e.g. mlp.down_proj)")
    ap.add_argument("--float-inputs", action="store_true",
                    help="each layer searched on the float layers' outputs (AutoAWQ's walk), not the rounded ones'")
    a = ap.parse_args()
    g = a.group_size
    model, tok = load_float_model(str(resolve(a.model)))
    ids = calibration_ids(tok, Path(a.calib).read_text(errors="replace"), 512, 16, a.calib)

    pending: list[int] = []  # --float-inputs: layers rounded only once the next layer's inputs are taken

    def round_layer(i):
        for name, m in Q._linears(model, i):
            if a.only in name:
                Q._set(m, rtn_quantize(m.weight.data, g, sym=False))

    def layer_step(i, layer, run):
        while pending:
            round_layer(pending.pop())
        gen = torch.Generator().manual_seed(i)
        groups = Q._input_groups(layer)
        inputs = Q._capture_inputs(layer, run, [m for _, ls in groups for m in ls],
                                   lambda mod, x, kept: x[torch.randperm(x.shape[0], generator=gen)[:2048]].clone())
        if a.variant.startswith("awq"):
            search = duo_scale if a.variant == "awq-duo" else awq.search_scale
            scales = [None if p is None else search(inputs[ls[0]], ls, lambda: run(awq.SEARCH_SEQS), g)[0]
                      for p, ls in groups]
            Q.fold_scales(groups, scales)
        if a.variant.startswith("rtn-clip"):
            exempt = {layer.self_attn.q_proj, layer.self_attn.k_proj}
            if a.variant == "rtn-clip-keep-down":
                exempt.add(layer.mlp.down_proj)
            for _, linears in groups:
                x = inputs[linears[0]]
                x = x[torch.randperm(x.shape[0], generator=gen)[:512]]
                for m in linears:
                    if m not in exempt:
                        m.weight.data.copy_(clipped(m.weight.data, x, g))
        if a.float_inputs:
            pending.append(i)
        else:
            round_layer(i)

    t0 = time.perf_counter()
    walk_layers(model, ids, layer_step, lambda layers: layers)
    while pending:
        round_layer(pending.pop())
    spent = time.perf_counter() - t0
    text = "\n\n".join(Path(f).read_text() for f in HELDOUT)
    held = Tokenizer.from_model_path(str(resolve(a.model))).encode(text, add_special_tokens=False)
    chunks = [held[i:i + 512] for i in range(0, len(held) - 511, 512)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            logp = torch.log_softmax(model(torch.tensor([c])).logits[0, :-1].float(), -1)
            nll -= logp.gather(1, torch.tensor(c[1:])[:, None]).sum().item()
            count += len(c) - 1
    only = (f", only {a.only}" if a.only else "") + (", float inputs" if a.float_inputs else "")
    print(f"{a.model} {a.variant} g{g}{only}: perplexity {math.exp(nll / count):.4f} on {len(chunks)} x 512 "
          f"held-out tokens (quantized in {spent:.0f} s)")


if __name__ == "__main__":
    main()
