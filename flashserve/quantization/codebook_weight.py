"""CodebookWeight: IQ2_XXS and IQ3_XXS weights at their own bits (2.0625 and 3.0625 a weight), where
the exact 8-bit form (gguf_codebook_forms.py) takes 5 as 4-bit indices in the tiles and 9 by rows.

A 256-value block of either type is a float16 d, then per 32 values grid indices (IQ2_XXS: 4, each
naming 8 of the grid's unsigned values; IQ3_XXS: 8, each naming 4) and a u32 of four 7-bit sign
indices and a 4-bit scale ls (ggml-common.h's block_iq2_xxs / block_iq3_xxs). The weight keeps those
bytes. By rows it holds the file's blocks (N, K/256, bytes); in the 16-lane tiles (to_wide_tiles), for
every 16 rows and span of 32 values, each row's bytes of the span, lane-major (4 bytes a lane: the
indices, then the u32; `codes`, (T, K/32, 128 or 192)), and the blocks' d (T, K/256, 16). The tiled
kernel (quant_matmul.cpp, codebook_matmul_tiles) looks each span's grid entries up in registers and
applies their signs as it goes, into the 8-bit tiles' codes: the numbers of the exact 8-bit form, bit
for bit.

Only where the build has the 16-lane tiles (AVX-512), with int8 activations; with float activations
(quantization="weight-only") every M takes the dequantized rows, gguf-py's values exactly.
"""
from __future__ import annotations

import sys
from functools import cache

import torch
import torch.nn.functional as F

from flashserve.kernels import ops
from flashserve.quantization.gguf_codebook_forms import CONVERT, grid
from flashserve.quantization.packed import GROUP, PackedWeight, _param

BLOCK = 256  # values of a block
BLOCK_BYTES = {"IQ2_XXS": 66, "IQ3_XXS": 98}
LANES = 16  # rows of a tile


def available() -> bool:
    """Whether this build runs codebook tiles (the 16-lane tiles of AVX-512)."""
    return ops.wide_tile_lanes() == LANES


@cache
def grid_words(qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The type's 256 grid entries as the kernel looks them up: int16 words of indices into the type's
    values (IQ2_XXS: 8 indices of 2 bits, nibble j holding entry values j and j + 4, as j | (j + 4) << 2;
    IQ3_XXS: 4 indices of 3 bits, one a nibble), and the values' unsigned codes (uint8, 16): byte i the
    code 128 + g_i of value i, byte 8 + i that of its negative, 128 - g_i (an index's bit 3 is its sign)."""
    entries = grid(qtype)  # (256, 8 or 4) unsigned values, all below 128
    values = entries.unique()  # ascending: 3 for IQ2_XXS, 8 for IQ3_XXS
    index = torch.searchsorted(values, entries)
    if entries.shape[1] == 8:
        index = index[:, :4] | (index[:, 4:] << 2)
    words = (index << (4 * torch.arange(4))).sum(dim=1)
    g = torch.cat([values, values.new_zeros(8 - len(values))])
    return words.to(torch.int16), torch.cat([128 + g, 128 - g]).to(torch.uint8)


def _span_words(qtype: str, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks (n, K/256, bytes) → each row's words per span (n, K/32, planes, 4): indices, then the u32."""
    n, nb = blocks.shape[:2]
    qs = blocks[:, :, 2:66].reshape(n, nb * 8, -1, 4)  # IQ2_XXS: indices and u32 interleaved; IQ3_XXS: indices
    if qtype == "IQ2_XXS":
        return qs
    aux = blocks[:, :, 66:98].reshape(n, nb * 8, 1, 4)
    return torch.cat([qs, aux], dim=2)


def _blocks_of(qtype: str, words: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """_span_words' inverse: words (n, K/32, planes, 4) and d (n, K/256) float16 → blocks (n, K/256, bytes)."""
    n, spans = words.shape[:2]
    nb = spans // 8
    head = d.contiguous().view(torch.uint8).reshape(n, nb, 2)
    if qtype == "IQ2_XXS":
        return torch.cat([head, words.reshape(n, nb, 64)], dim=2)
    return torch.cat([head, words[:, :, :2].reshape(n, nb, 64), words[:, :, 2].reshape(n, nb, 32)], dim=2)


def to_tiles(qtype: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (N, K/256, bytes) → (codes (T, K/32, 64 planes), d (T, K/256, 16) float16); the rows past
    N (to whole tiles) are zeros: d = 0, so they add nothing."""
    n, nb = blocks.shape[:2]
    pad = -n % LANES
    tiles = (n + pad) // LANES
    words = F.pad(_span_words(qtype, blocks), (0, 0, 0, 0, 0, 0, 0, pad))  # (T*16, K/32, planes, 4)
    codes = words.view(tiles, LANES, nb * 8, -1, 4).permute(0, 2, 3, 1, 4).reshape(tiles, nb * 8, -1)
    d = F.pad(blocks[:, :, 0:2].contiguous().view(torch.float16).reshape(n, nb), (0, 0, 0, pad))
    return codes.contiguous(), d.view(tiles, LANES, nb).transpose(1, 2).contiguous()


class CodebookWeight(PackedWeight):
    """An IQ2_XXS or IQ3_XXS weight in its own bytes (module docstring); `blocks` by rows until
    to_wide_tiles, then `codes` and `d` in tiles."""

    act_dtype = torch.float32
    kernel_dtype = torch.float32
    chunk_rows = 256
    # as GroupQuantWeight's exact 8-bit form would hold it (int_codes, scale_values): codes in groups of 32
    bits, group, zero = 8, GROUP, None

    def __init__(self, qtype: str, blocks: torch.Tensor):
        """blocks: (N, K/256 * bytes) uint8, the file's rows."""
        super().__init__()
        if qtype not in BLOCK_BYTES:
            raise ValueError(f"a codebook weight is IQ2_XXS or IQ3_XXS, not {qtype}")
        if blocks.dim() != 2 or blocks.shape[1] % BLOCK_BYTES[qtype]:
            raise ValueError(f"{qtype} weight: blocks {tuple(blocks.shape)} are not rows of "
                             f"{BLOCK_BYTES[qtype]}-byte blocks")
        self.qtype = qtype
        n, nb = blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[qtype]
        self.out_features, self.in_features = n, nb * BLOCK
        self.blocks = _param(blocks.contiguous().view(n, nb, BLOCK_BYTES[qtype]))
        self.codes = self.d = None
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
        codes, d = to_tiles(self.qtype, self.blocks)
        self.codes, self.d = _param(codes), _param(d)
        self.blocks = None
        self.tiled = True
        return True

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        codes, d = (self.codes, self.d) if self.tiled else to_tiles(self.qtype, self.blocks)  # by rows: per call
        return ops.codebook_matmul_tiles(x, codes, d, self.grid, self.grid_codes, self.out_features)

    def plan_part(self) -> tuple:
        """What the C++ decode step calls the kernel with (GroupQuantWeight.plan_part's shape)."""
        return (self.codes, self.d, None, 8, GROUP, True, True, None, self.out_features, None, self.grid_codes,
                self.grid)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        stop = self.out_features if end is None else min(end, self.out_features)
        codes, scale = self._exact(slice(start, stop))
        return (codes.float() * scale[..., None]).reshape(stop - start, self.in_features)

    def int_codes(self, index=slice(None)) -> torch.Tensor:
        """The signed grid values of rows `index` as integers (rows, K/32, 32), as the kernel multiplies them."""
        codes, _ = self._exact(index)
        return codes.to(torch.int32)

    def scale_values(self) -> torch.Tensor:
        """The scale of every group of 32 as float32 (N, K/32)."""
        return self._exact(slice(None))[1]

    def zero_values(self) -> None:
        return None

    def _exact(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (rows, K/32, 32) and scales (rows, K/32) of rows `index`, gguf_codebook_forms' exact form."""
        blocks = self.row_blocks(index)
        codes, scale = CONVERT[self.qtype](blocks.reshape(-1, BLOCK_BYTES[self.qtype]))
        rows = blocks.shape[0]
        return codes.reshape(rows, -1, GROUP), scale.reshape(rows, -1)

    def row_blocks(self, index) -> torch.Tensor:
        """The file's blocks of rows `index` (rows, K/256, bytes), from whichever order the weight holds."""
        if not self.tiled:
            return self.blocks[index]
        rows = torch.arange(self.out_features)[index]
        tile, lane = rows // LANES, rows % LANES
        tiles, spans, _ = self.codes.shape
        words = self.codes.view(tiles, spans, -1, LANES, 4)[tile, :, :, lane, :]  # (rows, K/32, planes, 4)
        return _blocks_of(self.qtype, words, self.d[tile, :, lane])
