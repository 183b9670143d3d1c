"""Bit fields of GGUF blocks read as torch integers: the pieces the exact forms (gguf_int8_forms.py,
gguf_codebook_forms.py) take blocks apart with. `b` is (blocks, bytes) uint8, a field's byte range of
every block; orders are those of ggml's dequantize_row_* (llama.cpp ggml-quants.c)."""
from __future__ import annotations

import torch

_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
# IQ4_NL's and IQ4_XS's 16 levels (ggml-common.h, kvalues_iq4nl)
IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=torch.int8)


def half(b: torch.Tensor) -> torch.Tensor:
    """A 2-byte field as float16, (blocks,)."""
    return b.contiguous().view(torch.float16)[:, 0]


def u16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian u16 fields as int32, (blocks, bytes / 2)."""
    return b.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def u32(b: torch.Tensor) -> torch.Tensor:
    """Little-endian u32 fields as int64, (blocks, bytes / 4)."""
    return b.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes → (..., 32): element j in the low nibble of byte j, j + 16 in the high one."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def nibble_pairs(b: torch.Tensor) -> torch.Tensor:
    """(blocks, j) bytes → (blocks, 2 j): the low nibble of byte i, then its high one."""
    return torch.stack([b & 0x0F, b >> 4], dim=2).reshape(len(b), -1)


def crumbs(qs: torch.Tensor) -> torch.Tensor:
    """(blocks, 32 c) bytes of 2-bit fields → (blocks, 128 c): per run of 32 bytes, bits 0-1 of each
    byte, then bits 2-3, 4-5, 6-7 (Q2_K's and TQ2_0's codes, Q3_K's low bits, Q6_K's high bits)."""
    return ((qs.reshape(len(qs), -1, 1, 32) >> _CRUMB_SHIFTS) & 3).reshape(len(qs), -1)
