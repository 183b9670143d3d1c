"""GGUF quantized tensors kept as raw blocks, and the 4-bit block types read as affine int4 groups.

Block layouts are ggml's (llama.cpp `ggml-common.h`; gguf-py `gguf/quants.py` reads the same
bytes). Every block runs along a row (the input dimension), so rows can be permuted with
their bytes, and a 32-element group of any 4-bit type below is exactly

    w = (q - 8) * s + z,   q in 0..15                                   (1)

which is the formula of torch's `_weight_int4pack_mm_for_cpu` (checked in the tests); the
symmetric types are also exactly int8 codes times a per-block scale (`int8_groups`).

    Q4_0  (18 B / 32):  d:f16, qs[16]            w = d * (q - 8)          s = d, z = 0
    Q4_1  (20 B / 32):  d:f16, m:f16, qs[16]     w = d * q + m            s = d, z = m + 8 d
    Q4_K (144 B / 256): d:f16, dmin:f16, 8 x (6-bit sc, 6-bit mn) in 12 B, qs[128]
                        w = d sc_j q - dmin mn_j (sub-block j of 32)      s = d sc_j, z = 8 d sc_j - dmin mn_j

In the 32-element types byte i of qs holds element i (low nibble) and element i + 16 (high
nibble); in Q4_K each 32-byte chunk c of qs holds sub-block 2c (low nibbles) and 2c + 1 (high).
s and z are computed here in float64, where they are exact.
"""
from __future__ import annotations

import mmap
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from flashserve.heap import madvise

INT4_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K})
# Symmetric types whose 32-element blocks are exactly int8 codes times a scale, w = d * c.
INT8_GROUP_TYPES = frozenset({GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q4_0})
GROUP = 32  # elements per int4 group (every type above has 32-element (sub-)blocks)


@dataclass
class GGUFTensor:
    """A 2-D quantized GGUF weight as stored: `raw` is (rows, bytes per row) uint8,
    `shape` is (rows, cols) = (out_features, in_features)."""

    raw: np.ndarray
    qtype: GGMLQuantizationType
    shape: tuple[int, int]

    def dequantize(self) -> np.ndarray:
        """float32 (rows, cols), as gguf-py's reference dequantization gives it (bit for bit): the K-quants
        the loader dequantizes (Q5_K and Q6_K to re-round as int8 groups, a Q4_K embedding) in torch on
        every thread, about 2x gguf-py's numpy; every other type through gguf-py."""
        fast = _TORCH_DEQUANTIZE.get(self.qtype)
        if fast is not None:
            blocks = _torch_view(_blocks(self).reshape(-1, GGML_QUANT_SIZES[self.qtype][1]))
            return fast(blocks).reshape(self.shape).numpy()
        from gguf import quants

        return np.asarray(quants.dequantize(self.raw, self.qtype), dtype=np.float32).reshape(self.shape)

    def block_bytes(self) -> torch.Tensor:
        """The raw bytes as a (rows, bytes per row) uint8 torch tensor, the file's own where they are
        contiguous (only read)."""
        return _torch_view(np.ascontiguousarray(self.raw))

    def release_pages(self) -> None:
        """Once packed, the file's bytes need not stay resident: while the model loads, every page read
        would otherwise count in the process's memory beside the packed copy until the end."""
        release_mapped(self.raw)


def release_mapped(view: np.ndarray) -> None:
    """madvise(MADV_DONTNEED) on the pages under `view`, a view of a read-only (shared) file
    mapping: they leave this process's resident set and a later read faults them back from the page
    cache, so nothing is lost. A no-op where the platform has no madvise, and for an array that is
    not such a view (rows the loader permuted are a copy on the heap, which this would zero)."""
    if not hasattr(mmap, "MADV_DONTNEED") or view.nbytes == 0 or not _is_file_mapping(view):
        return
    start = view.__array_interface__["data"][0]
    low = start - start % mmap.PAGESIZE
    madvise(low, start + view.nbytes - low, mmap.MADV_DONTNEED)


def _is_file_mapping(view: np.ndarray) -> bool:
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, mmap.mmap) and not base.closed


def _blocks(t: GGUFTensor) -> np.ndarray:
    """(rows, blocks per row, bytes per block) view of the raw bytes."""
    block, size = GGML_QUANT_SIZES[t.qtype]
    rows, cols = t.shape
    return np.ascontiguousarray(t.raw).reshape(rows, cols // block, size)


def _torch_view(a: np.ndarray) -> torch.Tensor:
    """A torch tensor over the same bytes, which are only read (often a read-only file mapping)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float64)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes → (..., 32) codes: element i in the low nibble of byte i, i + 16 in the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) packed bytes → 6-bit (scale, min), each (..., 8) (ggml `get_scale_min_k4`)."""
    a, b, c = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scale = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scale.astype(np.float64), mins.astype(np.float64)


def int4_groups(t: GGUFTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact form (1) of a Q4_0/Q4_1/Q4_K tensor: codes (rows, cols) uint8 in 0..15 and
    scale, zero (rows, cols / 32) float64."""
    packed, s, z = int4_packed(t)
    rows, cols = t.shape
    return _nibbles_32(packed.reshape(rows, cols // GROUP, GROUP // 2)).reshape(rows, cols), s, z


def int4_packed(t: GGUFTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int4_groups with the codes left packed: (rows, cols / 2) uint8, byte j of each group's 16
    holding code j (low nibble) and code j + 16 (high), the order of Q4_0/Q4_1 blocks, which are
    taken as they are; Q4_K's chunks (sub-block 2c in the low nibbles, 2c + 1 in the high) are
    rearranged into it."""
    rows, cols = t.shape
    b = _blocks(t)
    if t.qtype == GGMLQuantizationType.Q4_0:
        d = _f16(b[..., 0:2])
        packed, s, z = b[..., 2:18], d, np.zeros_like(d)
    elif t.qtype == GGMLQuantizationType.Q4_1:
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        packed, s, z = b[..., 4:20], d, m + 8.0 * d
    elif t.qtype == GGMLQuantizationType.Q4_K:
        packed, (sc, d), (mn, dmin) = _q4k_parts(t)
        s, z = d[..., None] * sc, 8.0 * d[..., None] * sc - dmin[..., None] * mn  # (rows, superblocks, 8)
    else:
        raise ValueError(f"{t.qtype.name} is not a 4-bit affine block type")
    return np.ascontiguousarray(packed).reshape(rows, cols // 2), s.reshape(rows, cols // GROUP), \
        z.reshape(rows, cols // GROUP)


def _q4k_parts(t: GGUFTensor) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A Q4_K tensor's codes in int4_packed's order (rows, superblocks, 4, 2, 16) uint8, and its
    (6-bit sc, d) and (6-bit mn, dmin): sc, mn (rows, superblocks, 8) float64, d, dmin (rows, superblocks)."""
    rows, _ = t.shape
    b = _blocks(t)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _q4k_scale_min(b[..., 4:16])
    # 4 chunks of 32 bytes per super-block, in halves; torch's threads rearrange them (the codes are
    # most of a file's bytes)
    qs = _torch_view(b)[..., 16:144].reshape(rows, -1, 4, 2, 16)
    first, second = qs[..., 0, :], qs[..., 1, :]  # chunk bytes j and j + 16
    low = (first & 0x0F) | (second << 4)  # sub-block 2c: codes j, j + 16
    high = (first >> 4) | (second & 0xF0)  # sub-block 2c + 1
    return torch.stack([low, high], dim=-2).numpy(), (sc, d), (mn, dmin)


def q4k_factored(t: GGUFTensor) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A Q4_K tensor in its own factored form, w = q * s + z with q the unsigned codes 0..15 of
    int4_packed and, per 32-value sub-block j of a super-block, s = d * sc_j and z = (-dmin) * mn_j:
    codes (rows, cols / 2) uint8, (sc (rows, cols / 32) uint8, d (rows, cols / 256) float16) and
    (mn, -dmin) likewise; the file's own integers and float16 factors, nothing rounded. The loader
    takes the same form from the C++ kernels (q4k_factored_parts, one pass); this is its reference."""
    rows, cols = t.shape
    packed, (sc, d), (mn, dmin) = _q4k_parts(t)
    ints = lambda a: a.astype(np.uint8).reshape(rows, cols // GROUP)  # noqa: E731
    return (np.ascontiguousarray(packed).reshape(rows, cols // 2), (ints(sc), d.astype(np.float16)),
            (ints(mn), (-dmin).astype(np.float16)))


def int5_packed(t: GGUFTensor) -> tuple[np.ndarray, np.ndarray]:
    """A Q5_0 tensor in the kernel's 5-bit layout, w = d * (q - 16) exactly: codes (rows, cols / 32 * 20)
    uint8, each block's qs[16] (codes j and j + 16 in the nibbles of byte j) then its qh (bit j: bit 4 of
    code j), i.e. the block without its scale; d (rows, cols / 32) float32 (float16 widened)."""
    if t.qtype != GGMLQuantizationType.Q5_0:
        raise ValueError(f"{t.qtype.name} is not Q5_0")
    rows, cols = t.shape
    b = _blocks(t)  # (rows, blocks, 22): d:f16, qh:u32, qs[16]
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    codes = np.concatenate([b[..., 6:22], b[..., 2:6]], axis=-1)  # (rows, blocks, 20)
    return codes.reshape(rows, cols // GROUP * 20), d


def int8_groups(t: GGUFTensor) -> tuple[np.ndarray, np.ndarray]:
    """Exact w = d * c of a Q8_0/Q5_0/Q4_0 tensor: codes (rows, cols) int8 and d (rows, cols / 32)
    float32 (float16 widened).

    Q8_0  (34 B / 32): d:f16, qs[32] int8            c = qs
    Q5_0  (22 B / 32): d:f16, qh:u32, qs[16]         c = (low nibble | bit i of qh << 4) - 16
    Q4_0  (18 B / 32): d:f16, qs[16]                 c = nibble - 8
    """
    rows, cols = t.shape
    b = _blocks(t)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    if t.qtype == GGMLQuantizationType.Q8_0:
        codes = b[..., 2:34].view(np.int8)
    elif t.qtype == GGMLQuantizationType.Q5_0:
        qh = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)  # (rows, blocks, 1): bit i → element i
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (rows, blocks, 32)
        codes = (_nibbles_32(b[..., 6:22]) | (high << 4)).astype(np.int8) - 16
    elif t.qtype == GGMLQuantizationType.Q4_0:
        codes = _nibbles_32(b[..., 2:18]).astype(np.int8) - 8
    else:
        raise ValueError(f"{t.qtype.name} is not a symmetric 32-element block type")
    return codes.reshape(rows, cols), d


# ---- Q4_K, Q5_K and Q6_K in torch, the same float32 operations in the same order as gguf-py's ----
# Q4_K (144 B / 256): as Q5_K without qh, q = nibble
# Q5_K (176 B / 256): d:f16, dmin:f16, 8 x (6-bit sc, 6-bit mn) in 12 B, qh[32], qs[128]
#                     w = (d sc_j) q - (dmin mn_j), q = nibble | bit j of qh << 4 (sub-block j of 32)
# Q6_K (210 B / 256): ql[128], qh[64], 16 int8 scales, d:f16     w = (d sc_j) (q - 32) (sub-block j of 16)

def _half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _kquant_affine(b: torch.Tensor, qs: torch.Tensor, high: torch.Tensor | None) -> torch.Tensor:
    """Q4_K/Q5_K: w = (d sc_j) q - (dmin mn_j) per sub-block j of 32, q the nibbles (| the high bits)."""
    n = b.shape[0]
    sc, mn = (torch.from_numpy(a.astype(np.float32)) for a in _q4k_scale_min(b[:, 4:16].numpy()))
    d = (_half(b[:, 0:2]) * sc).reshape(n, 8, 1)
    dm = (_half(b[:, 2:4]) * mn).reshape(n, 8, 1)
    qs = qs.reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)  # chunk c: sub-blocks 2c, 2c + 1
    if high is not None:
        q = q | (high << 4)
    return (d * q.float() - dm).reshape(n, 256)


def _q4k_dequantize(b: torch.Tensor) -> torch.Tensor:
    return _kquant_affine(b, b[:, 16:144], None)


def _q5k_dequantize(b: torch.Tensor) -> torch.Tensor:
    qh = b[:, 16:48]
    high = torch.stack([(qh >> j) & 1 for j in range(8)], dim=1)  # (n, 8, 32): bit j, sub-block j
    return _kquant_affine(b, b[:, 48:176], high)


def _q6k_dequantize(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = (_half(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    ql = b[:, 0:128].reshape(n, 2, 1, 64)  # two halves of 128 values: 64 low nibbles, then 64 high
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 32)
    high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, 256)


_TORCH_DEQUANTIZE = {GGMLQuantizationType.Q4_K: _q4k_dequantize, GGMLQuantizationType.Q5_K: _q5k_dequantize,
                     GGMLQuantizationType.Q6_K: _q6k_dequantize}

