"""CodebookWeight: the i-quants built on codebooks (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) at
their own bits (1.56 to 3.44 a weight), where their exact 8-bit forms (gguf_codebook_forms.py) take 5 to 6 in
the tiles and 9 to 10 by rows. In the tiles, the types whose grids are too large to look up fast (IQ2_S's
1024 entries, IQ1_*'s 2048: Layout.index_high) hold each entry's 16-bit grid word where the file has the low byte of
its index: IQ1_S 2.19 bits a weight, IQ1_M 2.375, IQ2_S 3.31.

A 256-value block of these types holds, per run of values, indices into the type's grid (each naming 8 or 4
of its values), their signs (or a sign index, or IQ1's delta), and sub-block scales, with a float16 d
(ggml-common.h's block_iq*; `LAYOUTS` below names the fields). The weight keeps those bytes. By rows it holds
the file's blocks (N, K/256, bytes); in the 16-lane tiles (to_wide_tiles), for every 16 rows and span of 32
values, each row's bytes of the fields that come per span, lane-major (4 bytes a lane; `codes`, (T, K/32,
64 planes)), the blocks' other fields per block and lane (`side`, (T, K/256, S, 16)) and d (T, K/256, 16).
The tiled kernel (quant_matmul.cpp, codebook_matmul_tiles) looks each span's grid entries up and applies
their signs as it goes, into the 8-bit tiles' codes: the numbers of the exact 8-bit form, bit for bit.

Only where the build has the 16-lane tiles (AVX-512), with int8 activations; with float activations
(quantization="weight-only") every M takes the dequantized rows, gguf-py's values exactly.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from flashserve.kernels import ops
from flashserve.quantization.gguf_bits import u16
from flashserve.quantization.gguf_codebook_forms import CONVERT, GROUPS, grid
from flashserve.quantization.packed import PackedWeight, _param

BLOCK = 256  # values of a block
SPANS = BLOCK // 32
LANES = 16  # rows of a tile


@dataclass(frozen=True)
class Layout:
    """Where a block's fields are (byte offsets), as the tiles split them."""
    bytes: int
    spans: tuple[tuple[int, int], ...]  # (offset, bytes a span) of the fields that come per 32 values, in plane order
    side: tuple[tuple[int, int], ...]  # (offset, length) of the other fields, kept per block
    d_first: bool = True  # the block starts with its float16 d (IQ1_M spreads d over its scales' top nibbles)
    # grids looked up when stored: the first per-span field is the low bytes of the span's 4 grid indices
    # (entries of 8 values), the rest of each index is index_high(blocks) (n, K/256, 8, 4); the tiles hold the
    # entries' grid words there
    index_high: Callable[[torch.Tensor], torch.Tensor] | None = None


LAYOUTS = {
    "IQ2_XXS": Layout(66, spans=((2, 8),), side=()),  # per span: 4 indices, u32 of sign indices and ls
    "IQ3_XXS": Layout(98, spans=((2, 8), (66, 4)), side=()),  # 8 indices; u32s of sign indices and ls
    "IQ2_XS": Layout(74, spans=((2, 8),), side=((66, 8),)),  # 4 u16 (index, sign index); ls bytes
    "IQ2_S": Layout(82, spans=((2, 4), (34, 4)), side=((66, 8), (74, 8)),  # indices, signs; qh, ls bytes
                    index_high=lambda b: (b[:, :, 66:74, None] >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3),
    "IQ3_S": Layout(110, spans=((2, 8), (74, 4)), side=((66, 8), (106, 4))),  # indices, signs; qh, ls nibbles
    "IQ1_S": Layout(50, spans=((2, 4),), side=((34, 16),),  # indices; u16 of high bits, ls, delta sign
                    index_high=lambda b: (_u16s(b[:, :, 34:50])[..., None] >> torch.tensor([0, 3, 6, 9])) & 7),
    "IQ1_M": Layout(56, spans=((0, 4),), side=((32, 24),), d_first=False,  # indices; qh, u16 of ls (and d)
                    index_high=lambda b: (b[:, :, 32:48, None] >> torch.tensor([0, 4], dtype=torch.uint8)).flatten(2)
                    .unflatten(2, (8, 4)) & 7),
}
BLOCK_BYTES = {name: layout.bytes for name, layout in LAYOUTS.items()}


def available() -> bool:
    """Whether this build runs codebook tiles (the 16-lane tiles of AVX-512)."""
    return ops.wide_tile_lanes() == LANES


@cache
def grid_words(qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The type's grid entries as the kernel looks them up: int16 words of indices into the type's values
    (entries of 8 values of 3 levels: 2 bits each, nibble j holding entry values j and j + 4, as
    j | (j + 4) << 2; entries of 4 values of 8 levels: one a nibble); and the values' unsigned codes (uint8, 16): byte i the code 128 + c of value i's code c in
    the exact form (g_i; IQ1: 8 g_i + 1), byte 8 + i that of its negative (-g_i; IQ1: the delta's, 8 g_i - 1),
    so that an index's bit 3 is its sign."""
    entries = grid(qtype)  # (entries, 8 or 4) values, at most 62 in size
    values = entries.unique()  # ascending: 3 levels, or 8
    index = torch.searchsorted(values, entries)
    if entries.shape[1] == 8:
        index = index[:, :4] | (index[:, 4:] << 2)
    words = (index << (4 * torch.arange(4))).sum(dim=1)
    pad = values.new_zeros(8 - len(values))
    if qtype.startswith("IQ1"):
        positive, negative = torch.cat([8 * values + 1, pad]), torch.cat([8 * values - 1, pad])
    else:
        positive, negative = torch.cat([values, pad]), torch.cat([-values, pad])
    return words.to(torch.int16), (128 + torch.cat([positive, negative])).to(torch.uint8)


def _block_d(qtype: str, blocks: torch.Tensor) -> torch.Tensor:
    """Each block's float16 d (n, K/256); IQ1_M's from the top nibbles of its four scale u16s."""
    n, nb = blocks.shape[:2]
    if LAYOUTS[qtype].d_first:
        return blocks[:, :, 0:2].contiguous().view(torch.float16).reshape(n, nb)
    tops = u16(blocks[:, :, 48:56].reshape(n * nb, 8)) >> 12  # (n nb, 4)
    bits = (tops << torch.tensor([0, 4, 8, 12])).sum(dim=1)
    return torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(torch.float16).reshape(n, nb)


def _u16s(b: torch.Tensor) -> torch.Tensor:
    """(n, nb, 2 j) bytes → (n, nb, j) little-endian u16 as int64."""
    return b[..., 0::2].long() | (b[..., 1::2].long() << 8)


@cache
def _index_of_word(qtype: str) -> torch.Tensor:
    """Each 16-bit grid word's entry (the grid's entries are distinct), as int64 over 65536 words."""
    inverse = torch.zeros(1 << 16, dtype=torch.int64)
    inverse[grid_words(qtype)[0].long() & 0xFFFF] = torch.arange(len(grid(qtype)))
    return inverse


def _split(qtype: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (n, K/256, bytes) → each row's words per span (n, K/32, planes, 4) and side bytes (n, K/256, S).
    A grid looked up when stored (Layout.index_high): the indices' low bytes become the entries' grid words."""
    layout, (n, nb) = LAYOUTS[qtype], blocks.shape[:2]
    per_span = [blocks[:, :, o:o + SPANS * k].reshape(n, nb, SPANS, k) for o, k in layout.spans]
    if layout.index_high is not None:
        index = per_span[0].long() | (layout.index_high(blocks).reshape(n, nb, SPANS, 4).long() << 8)
        per_span[0] = grid_words(qtype)[0][index].view(torch.uint8)  # (n, nb, 8, 8)
    words = torch.cat(per_span, dim=3).reshape(n, nb * SPANS, -1, 4)
    side = torch.cat([blocks[:, :, o:o + k] for o, k in layout.side], dim=2) if layout.side else blocks[:, :, :0]
    return words, side


def _blocks_of(qtype: str, words: torch.Tensor, side: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """_split's inverse, with d (n, K/256) float16 → blocks (n, K/256, bytes)."""
    layout, n = LAYOUTS[qtype], words.shape[0]
    nb = words.shape[1] // SPANS
    blocks = words.new_zeros(n, nb, layout.bytes)
    if layout.d_first:
        blocks[:, :, 0:2] = d.contiguous().view(torch.uint8).reshape(n, nb, 2)
    widths = [k for _, k in layout.spans]
    if layout.index_high is not None:
        widths[0] = 8  # four grid words
    per_span = list(words.reshape(n, nb, SPANS, -1).split(widths, dim=3))
    if layout.index_high is not None:  # each word's entry; its low byte is the file's
        entries = _index_of_word(qtype)[per_span[0].contiguous().view(torch.int16).long() & 0xFFFF]
        per_span[0] = (entries & 0xFF).to(torch.uint8)
    for (o, k), field in zip(layout.spans, per_span):
        blocks[:, :, o:o + SPANS * k] = field.reshape(n, nb, SPANS * k)
    at = 0
    for o, k in layout.side:
        blocks[:, :, o:o + k] = side[:, :, at:at + k]
        at += k
    return blocks


def to_tiles(qtype: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks (N, K/256, bytes) → (codes (T, K/32, 64 planes), d (T, K/256, 16) float16, side (T, K/256, S,
    16)); the rows past N (to whole tiles) are zeros: d = 0, so they add nothing."""
    n, nb = blocks.shape[:2]
    pad = -n % LANES
    tiles = (n + pad) // LANES
    words, side = _split(qtype, blocks)
    words = F.pad(words, (0, 0, 0, 0, 0, 0, 0, pad))  # (T*16, K/32, planes, 4)
    codes = words.view(tiles, LANES, nb * SPANS, -1, 4).permute(0, 2, 3, 1, 4).reshape(tiles, nb * SPANS, -1)
    d = F.pad(_block_d(qtype, blocks), (0, 0, 0, pad)).view(tiles, LANES, nb).transpose(1, 2)
    side = F.pad(side, (0, 0, 0, 0, 0, pad)).view(tiles, LANES, nb, -1).permute(0, 2, 3, 1)
    return codes.contiguous(), d.contiguous(), side.contiguous()


class CodebookWeight(PackedWeight):
    """An i-quant weight in its own bytes (module docstring); `blocks` by rows until to_wide_tiles, then
    `codes`, `d` and `side` in tiles."""

    act_dtype = torch.float32
    kernel_dtype = torch.float32
    chunk_rows = 256
    # as GroupQuantWeight's exact 8-bit form would hold it (int_codes, scale_values): codes in groups of
    # `group` (32, or 16: IQ2_XS, IQ2_S, IQ1_M)
    bits, zero = 8, None

    def __init__(self, qtype: str, blocks: torch.Tensor):
        """blocks: (N, K/256 * bytes) uint8, the file's rows."""
        super().__init__()
        if qtype not in BLOCK_BYTES:
            raise ValueError(f"a codebook weight is one of {', '.join(BLOCK_BYTES)}, not {qtype}")
        if blocks.dim() != 2 or blocks.shape[1] % BLOCK_BYTES[qtype]:
            raise ValueError(f"{qtype} weight: blocks {tuple(blocks.shape)} are not rows of "
                             f"{BLOCK_BYTES[qtype]}-byte blocks")
        self.qtype = qtype
        self.group = GROUPS[qtype]
        n, nb = blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[qtype]
        self.out_features, self.in_features = n, nb * BLOCK
        self.blocks = _param(blocks.contiguous().view(n, nb, BLOCK_BYTES[qtype]))
        self.codes = self.d = self.side = None
        self.tiled = False
        self.grid, self.grid_codes = grid_words(qtype)
        self.set_int8_activations(False)

    def set_int8_activations(self, on: bool) -> None:
        """With int8 activations the tiled kernel runs every M; without, the dequantized rows do."""
        if self.tiled and not on:
            raise ValueError("a weight stored in tiles runs with int8 activations only")
        self.int8_activations = on
        self.large_m = sys.maxsize if on else 0

    def to_wide_tiles(self) -> bool:
        """Store the blocks in the tiles' order (module docstring); False where it does not apply."""
        if self.tiled or not self.int8_activations or not available():
            return False
        codes, d, side = to_tiles(self.qtype, self.blocks)
        self.codes, self.d, self.side = _param(codes), _param(d), _param(side)
        self.blocks = None
        self.tiled = True
        return True

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        codes, d, side = (self.codes, self.d, self.side) if self.tiled else to_tiles(self.qtype, self.blocks)  # by rows: per call
        return ops.codebook_matmul_tiles(x, codes, d, side, self.grid, self.grid_codes, self.qtype, self.out_features)

    def plan_part(self) -> tuple:
        """What the C++ decode step calls the kernel with (GroupQuantWeight.plan_part's shape)."""
        return (self.codes, self.d, None, 8, self.group, True, True, None, self.out_features, None, None,
                (self.qtype, self.grid, self.grid_codes, self.side))

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        stop = self.out_features if end is None else min(end, self.out_features)
        codes, scale = self._exact(slice(start, stop))
        return (codes.float() * scale[..., None]).reshape(stop - start, self.in_features)

    def int_codes(self, index=slice(None)) -> torch.Tensor:
        """The exact form's codes of rows `index` as integers (rows, K/group, group), as the kernel multiplies them."""
        codes, _ = self._exact(index)
        return codes.to(torch.int32)

    def scale_values(self) -> torch.Tensor:
        """The scale of every group as float32 (N, K/group)."""
        return self._exact(slice(None))[1]

    def zero_values(self) -> None:
        return None

    def _exact(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (rows, K/group, group) and scales (rows, K/group) of rows `index`, gguf_codebook_forms'
        exact form."""
        blocks = self.row_blocks(index)
        codes, scale = CONVERT[self.qtype](blocks.reshape(-1, BLOCK_BYTES[self.qtype]))
        if isinstance(scale, tuple):  # IQ3_S: integers (2 ls + 1) and d, their product exact in float32
            ints, d = scale
            scale = ints.float() * d.float()[:, None]
        rows = blocks.shape[0]
        return codes.reshape(rows, -1, self.group), scale.reshape(rows, -1)

    def row_blocks(self, index) -> torch.Tensor:
        """The file's blocks of rows `index` (rows, K/256, bytes), from whichever order the weight holds."""
        if not self.tiled:
            return self.blocks[index]
        rows = torch.arange(self.out_features)[index]
        tile, lane = rows // LANES, rows % LANES
        tiles, spans, _ = self.codes.shape
        words = self.codes.view(tiles, spans, -1, LANES, 4)[tile, :, :, lane, :]  # (rows, K/32, planes, 4)
        return _blocks_of(self.qtype, words, self.side[tile, :, :, lane], self.d[tile, :, lane])
