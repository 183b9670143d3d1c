"""4-bit group-quantized linears in the two Hugging Face checkpoint formats (GPTQ and AWQ), both ways.

One linear W (N out, K in) quantized to 4 bits in groups of g input columns is, in either format,

    W[n, k] = (q[n, k] - z[n, G(k)]) * s[n, G(k)],   q, z in 0..15, s float16, G(k) = g_idx[k]

and the formats differ only in how q and z are laid out in int32 words of 8 nibbles (nibble i holds
bits 4i..4i+3):

    GPTQ (AutoGPTQ's v1, checkpoint_format "gptq"; what transformers and vLLM read as quant_method gptq)
      qweight (K/8, N)  int32: nibble i of word [r, n] = q[n, 8r + i]           (packed along K)
      qzeros  (K/g, N/8) int32: nibble i of word [j, c] = z[8c + i, j] - 1      (stored off by one)
      scales  (K/g, N)  float16;  g_idx (K,) int32: the group of each input column
                        (k // g, or a permutation of it with act-order, desc_act)
    AWQ (AutoAWQ's GEMM version, quant_method awq, version gemm, zero_point)
      qweight (K, N/8)  int32: nibble i of word [k, c] = q[8c + ORDER[i], k]   (packed along N)
      qzeros  (K/g, N/8) int32: nibble i of word [j, c] = z[8c + ORDER[i], j]
      scales  (K/g, N)  float16; no g_idx (groups are k // g)

ORDER = 0 2 4 6 1 3 5 7 is AWQ's interleave (its GEMM kernel unpacks pairs of nibbles at once).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from flashserve.errors import ModelFormatError

BITS = 4
PACK = 32 // BITS  # nibbles per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FORMATS = ("gptq", "awq")
GROUP_SIZES = (32, 64, 128)  # multiples of the kernel's group of 32 (the kernel repeats a group's s and z)


@dataclass
class Int4Groups:
    """One 4-bit linear as the formats above describe it, unpacked: codes q (N, K) uint8,
    scale s (N, K/g) float32 holding float16 values, zero z (N, K/g) uint8, g_idx (K,) int64."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> np.ndarray:
        """(q - z) * s as float32 (N, K): exact, since |q - z| <= 15 and s has 11 significant bits."""
        s, z = self.scale[:, self.g_idx], self.zero[:, self.g_idx].float()  # (N, K) each
        return ((self.codes.float() - z) * s).numpy()

    def release_pages(self) -> None:
        """Nothing is memory-mapped (the loader's interface for GGUF blocks)."""

    def column_order(self) -> torch.Tensor | None:
        """None when groups are consecutive columns (G(k) = k // g); else the permutation that
        makes them so (act-order): columns order[j*g : (j+1)*g] are group j."""
        if torch.equal(self.g_idx, torch.arange(self.shape[1]) // self.group):
            return None
        return torch.argsort(self.g_idx, stable=True)

    def kernel_tables(self, order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (N, K) in column order `order`, s and -z * s per group of 32 along those columns,
        float32 (N, K/32)): W = q * s + (-z s) exactly, in the kernel's form."""
        codes = self.codes if order is None else self.codes[:, order]
        per32 = torch.arange(0, self.shape[1], 32)  # first column of each kernel group
        groups = (self.g_idx if order is None else self.g_idx[order])[per32]  # (K/32,)
        s = self.scale[:, groups]
        return codes.contiguous(), s.contiguous(), (-self.zero[:, groups].float() * s).contiguous()


def check_group(group: int, in_features: int, name: str = "weight") -> None:
    if group not in GROUP_SIZES:
        raise ValueError(f"group size {group}: choose from {', '.join(map(str, GROUP_SIZES))}")
    if in_features % group:
        raise ValueError(f"{name}: group size {group} does not divide its row of {in_features} input features")


# --- packing -------------------------------------------------------------------------------------

def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 8m) values in 0..15 → (..., m) int32, value 8c + i in nibble i of word c."""
    q = q.to(torch.int64).reshape(*q.shape[:-1], -1, PACK)
    words = (q << (BITS * torch.arange(PACK))).sum(-1)  # < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """(..., m) int32 → (..., 8m) uint8, the inverse of _pack_nibbles."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    q = (w[..., None] >> (BITS * torch.arange(PACK))) & 0xF
    return q.reshape(*words.shape[:-1], -1).to(torch.uint8)


_AWQ_INVERSE = tuple(AWQ_ORDER.index(i) for i in range(PACK))


def pack(fmt: str, g: Int4Groups) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one linear ("qweight", "qzeros", "scales" and GPTQ's "g_idx")."""
    n, k = g.shape
    if n % PACK:
        raise ValueError(f"{n} output features: the {fmt} format packs them in words of {PACK}")
    scales = g.scale.t().half().contiguous()  # (K/g, N)
    if fmt == "gptq":
        return {"qweight": _pack_nibbles(g.codes).t().contiguous(),
                "qzeros": _pack_nibbles((g.zero.to(torch.int64) - 1).t() & 0xF),  # v1 stores z - 1
                "scales": scales, "g_idx": g.g_idx.to(torch.int32)}
    interleave = lambda t: t.reshape(*t.shape[:-1], -1, PACK)[..., AWQ_ORDER].reshape(t.shape)  # noqa: E731
    return {"qweight": _pack_nibbles(interleave(g.codes.t())), "qzeros": _pack_nibbles(interleave(g.zero.t())),
            "scales": scales}


def unpack(fmt: str, tensors: dict[str, torch.Tensor], group: int, name: str = "weight") -> Int4Groups:
    """The inverse of pack, checking shapes against each other."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if fmt == "gptq":
        codes = _unpack_nibbles(qweight.t()).contiguous()  # (N, K)
        zero = ((_unpack_nibbles(qzeros).to(torch.int16) + 1) & 0xF).to(torch.uint8).t()  # (N, K/g)
        g_idx = tensors.get("g_idx")
    else:
        restore = lambda t: t.reshape(*t.shape[:-1], -1, PACK)[..., _AWQ_INVERSE].reshape(t.shape)  # noqa: E731
        codes = restore(_unpack_nibbles(qweight)).t().contiguous()
        zero = restore(_unpack_nibbles(qzeros)).t()
        g_idx = None
    n, k = codes.shape
    g_idx = torch.arange(k) // group if g_idx is None else g_idx.to(torch.int64)
    expected = {"scales": (k // group, n), "qzeros": (k // group, n // PACK), "g_idx": (k,)}
    for key, shape in expected.items():
        got = tensors[key].shape if key in tensors else g_idx.shape
        if k % group or tuple(got) != shape:
            raise ModelFormatError(f"{name}: {fmt} {key} is {tuple(got)}, expected {shape} for a {n}x{k} "
                                   f"weight in groups of {group}")
    counts = torch.bincount(g_idx, minlength=k // group)
    if len(counts) != k // group or not bool((counts == group).all()):
        raise ModelFormatError(f"{name}: g_idx does not put {group} columns in each of {k // group} groups")
    return Int4Groups(codes, scales.t().float().contiguous(), zero.contiguous(), g_idx, group)


# --- config.json and the checkpoint's tensor stream -------------------------------------------------

@dataclass(frozen=True)
class Int4Format:
    method: str  # "gptq" | "awq"
    group: int
    desc_act: bool = False

    def config(self) -> dict:
        """config.json's quantization_config, as transformers and vLLM read it."""
        if self.method == "gptq":
            return {"quant_method": "gptq", "bits": BITS, "group_size": self.group, "desc_act": self.desc_act,
                    "sym": True, "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True}
        return {"quant_method": "awq", "bits": BITS, "group_size": self.group, "version": "gemm",
                "zero_point": True}


def int4_format(quantization_config: dict | None, where: str) -> Int4Format | None:
    """The checkpoint's format from config.json's quantization_config; None for a float checkpoint."""
    if quantization_config is None:
        return None
    q = quantization_config
    method = q.get("quant_method")
    if method not in FORMATS or q.get("bits") != BITS or q.get("group_size") not in GROUP_SIZES:
        raise ModelFormatError(f"{where}: quantization_config {q} is not one flashserve reads "
                               f"(4-bit gptq or awq, group size {', '.join(map(str, GROUP_SIZES))})")
    if method == "awq" and (q.get("version", "gemm").lower() != "gemm" or not q.get("zero_point", True)):
        raise ModelFormatError(f"{where}: only AWQ's GEMM version with zero points is read, not {q}")
    if method == "gptq" and q.get("checkpoint_format", "gptq") != "gptq":
        raise ModelFormatError(f"{where}: only GPTQ's v1 checkpoint_format 'gptq' is read, not {q}")
    return Int4Format(method, q["group_size"], bool(q.get("desc_act", False)))


_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def read_int4(tensors: Iterator[tuple[str, torch.Tensor]], fmt: Int4Format, keep_quantized: bool
              ) -> Iterator[tuple[str, torch.Tensor | Int4Groups]]:
    """A checkpoint's (name, tensor) stream with each linear's packed tensors gathered into one
    `<module>.weight`: an Int4Groups (keep_quantized) or its float32 dequantization."""
    need = {"qweight", "qzeros", "scales"} | ({"g_idx"} if fmt.method == "gptq" else set())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        module, _, kind = name.rpartition(".")
        if kind not in _PARTS:
            yield name, t
            continue
        parts = pending.setdefault(module, {})
        parts[kind] = t
        if need <= parts.keys():
            g = unpack(fmt.method, pending.pop(module), fmt.group, module)
            yield f"{module}.weight", g if keep_quantized else torch.from_numpy(g.dequantize())
    if pending:
        module, parts = next(iter(pending.items()))
        raise ModelFormatError(f"{module}: the checkpoint has {sorted(parts)} but not {sorted(need - parts.keys())}")
