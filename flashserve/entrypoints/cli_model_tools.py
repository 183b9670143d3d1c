"""The subcommands that write a file made from a model: quantize (a GPTQ/AWQ checkpoint or a GGUF
file), imatrix (an importance matrix for quantize) and profile-neurons (a hot-neuron profile for
--hot-neuron-profile). The parser is cli.py's; each group adds its subcommands to it."""
from __future__ import annotations

import argparse
from pathlib import Path

from flashserve.errors import FlashserveError


def add_model_tool_commands(sub) -> None:
    """quantize, imatrix and profile-neurons, on the subparsers `sub`."""
    p = sub.add_parser("quantize", help="write a 4-bit GPTQ or AWQ checkpoint (Hugging Face format) of a float "
                                        "model, calibrated on a text file, or a GGUF file of another type")
    p.add_argument("--method", required=True, choices=["gptq", "awq", "rtn", "rtn-sym", "gguf"],
                   help="rtn / rtn-sym: round-to-nearest baselines in the AWQ / GPTQ format; "
                        "gguf: a GGUF file of --type (from a GGUF file or an HF directory), weighted by --imatrix")
    p.add_argument("--type", default="Q4_K", help="gguf: the linears' type (Q4_K Q5_K Q6_K Q8_0 Q4_0 Q4_1 Q5_0 "
                                                  "Q5_1); K-quants on rows not a multiple of 256 fall back as "
                                                  "llama.cpp's do (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0)")
    p.add_argument("--output-type", default="Q6_K", help="gguf: the type of the embedding and LM head")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="gguf: an importance matrix: flashserve imatrix's, or llama-imatrix's (imatrix.gguf or "
                        "legacy .dat), told apart by content")
    p.add_argument("--model", default="smollm2-135m",
                   help="the float model: an HF directory, or a .gguf file or built-in name (dequantized)")
    p.add_argument("--out", required=True, help="the checkpoint directory to create (must not exist)")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128])
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text (default: the GNU GPL v3 text Debian ships in its common licences)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation (desc_act)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: each group's grid over the clipped range that rounds it best (default), or over "
                        "its whole range")
    p.add_argument("--max-seqs", type=int, default=None,
                   help="calibration sequences of up to 512 tokens taken from --calib (default 16)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("imatrix", help="the importance matrix (mean squared input activation per column of every "
                                       "linear weight) of a model on calibration text, for quantize --method gguf")
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file, a local HF directory, or a built-in name")
    p.add_argument("--calib", required=True, metavar="FILE", help="calibration text")
    p.add_argument("--out", required=True, help="the file to write (must not exist): *.gguf and *.dat in "
                                                "llama.cpp's formats (for llama-quantize --imatrix), any other "
                                                "name flashserve's safetensors")
    p.add_argument("--max-seqs", type=int, default=32, help="calibration sequences of 512 tokens at most")
    p.set_defaults(func=cmd_imatrix)

    p = sub.add_parser("profile-neurons", help="how often each FFN neuron is active on calibration text (per layer "
                                               "sparsity; optionally a low-rank activity predictor), for "
                                               "--hot-neuron-profile")
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file, a local HF directory, or a built-in name")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text (default: the GNU GPL v3 text Debian ships in its common licences)")
    p.add_argument("--out", required=True, help="the profile file to write")
    # Defaults (None here) are profile_model's, so the parser needs no torch import.
    p.add_argument("--threshold", type=float, default=None,
                   help="a neuron is active at a token when its contribution |a_j| ||down[:, j]|| exceeds this "
                        "fraction of the token's largest (default 0.01)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    p.add_argument("--max-seqs", type=int, default=None, help="calibration sequences (default 4)")
    p.add_argument("--predictor-rank", type=int, default=None, metavar="R",
                   help="also train a rank-R activity predictor per layer (needed by --neuron-predictor)")
    p.add_argument("--target-recall", type=float, default=None,
                   help="the predictor's cutoff: this fraction of the active neurons of the training tokens predicted "
                        "active (default 0.99; lower skips more and changes more)")
    p.set_defaults(func=cmd_profile_neurons)


def cmd_quantize(a) -> None:
    from tqdm import tqdm

    if a.method == "gguf":
        return _quantize_gguf(a)
    from flashserve.quantization.quantize import QuantizeArgs, quantize_model

    args = QuantizeArgs(method=a.method, model=a.model, out=a.out, group_size=a.group_size, calib=a.calib,
                        act_order=a.act_order, clip=a.clip, **({} if a.max_seqs is None else {"max_seqs": a.max_seqs}))
    summary = quantize_model(args, progress=lambda layers: tqdm(layers, desc=f"{a.method}", unit="layer"))
    for note in summary["notes"]:
        print(note)
    print(f"wrote {a.out} ({a.method}, group size {a.group_size}, {summary['calibration_tokens']} calibration "
          f"tokens); peak memory {summary['peak_rss_mib']:.0f} MiB")


def cmd_profile_neurons(a) -> None:
    from flashserve.model.catalogue import resolve
    from flashserve.offload.neuron_profile import profile_model

    options = ("threshold", "seq_len", "max_seqs", "target_recall")
    given = {k: getattr(a, k) for k in options if getattr(a, k) is not None}
    profile = profile_model(str(resolve(a.model)), a.calib, predictor_rank=a.predictor_rank, **given)
    profile.save(a.out)
    print(profile.table())
    if profile.predictor is not None:
        p = profile.predictor
        print(f"predictor rank {p['rank']}: held-out recall {p['recall'].mean():.3f} "
              f"(min {p['recall'].min():.3f}), neurons predicted active {p['predicted_active'].mean():.3f}")
    print(f"wrote {a.out}")


def _quantize_gguf(a) -> None:
    from tqdm import tqdm

    from flashserve.quantization.gguf_export import GGUFQuantizeArgs, quantize_gguf

    args = GGUFQuantizeArgs(model=a.model, out=a.out, qtype=a.type, output_type=a.output_type, imatrix=a.imatrix)
    summary = quantize_gguf(args, progress=lambda ts: tqdm(ts, desc=a.type, unit="tensor"))
    for note in summary["notes"]:
        print(note)
    types = ", ".join(f"{n} {k}" for k, n in summary["types"].most_common())
    print(f"wrote {a.out} ({types} tensors{', importance matrix ' + a.imatrix if a.imatrix else ''}); "
          f"peak memory {summary['peak_rss_mib']:.0f} MiB")


def cmd_imatrix(a) -> None:
    import resource

    from tqdm import tqdm

    from flashserve.quantization.imatrix import compute_imatrix, save_imatrix

    if Path(a.out).exists():
        raise FlashserveError(f"{a.out} exists; choose a new output path")
    imatrix, tokens, seq_len = compute_imatrix(a.model, a.calib, max_seqs=a.max_seqs,
                                               progress=lambda s: tqdm(s, desc="imatrix", unit="seq"))
    save_imatrix(a.out, imatrix, tokens, a.calib, chunk_size=seq_len)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"wrote {a.out} ({len(imatrix)} weights, {tokens} calibration tokens); peak memory {peak:.0f} MiB")

