"""8-bit weights stored in the tiled GEMM's own order (GroupQuantWeight.to_wide_tiles): on a build with
16-lane tiles (AVX-512) every M gives the row-major kernel's numbers bit for bit, and row lookups,
dequantization and scales read back what was stored; a build without them keeps the weight by rows.
The engine stores its LM head so, and its tied embedding rows stay gguf-py's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flashserve.kernels import ops
from flashserve.quantization.group_quant_weight import GroupQuantWeight, factored_table


def weight_pair(n: int, k: int, scale_dtype: torch.dtype, seed: int, group: int = 32, six_bit: bool = False,
                zero_dtype: torch.dtype | None = None, two_bit: bool = False,
                three_bit: bool = False) -> tuple[GroupQuantWeight, GroupQuantWeight]:
    """The same random 8-bit weight twice: by rows, and to be tiled (its own copy of the codes). A
    uint8 scale_dtype: a factored table, whose values the tiles hold. six_bit: Q6_K's form as
    gguf_int8_forms makes it, codes ±(q - 32) with q in 0..63 and the sign of the group's int8 scale
    (-128..127; its magnitude in the table), so some groups reach +32, others -32. zero_dtype: a zero
    table too (uint8: factored, as Q2_K's -dmin * mn); two_bit: codes 0..3 (Q2_K's); three_bit: Q3_K's
    form, codes ±q with q in -4..3 and the sign of the group's scale (sc - 32 in -32..31)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    ints = torch.randint(0, 129, (n, k // group), dtype=torch.uint8, generator=gen)
    if six_bit:
        signed = torch.randint(-128, 128, (n, k // group), generator=gen)
        signed[0, :3] = torch.tensor([-128, 127, 0])  # the ends of int8 (|-128| is 128 in the table)
        q = torch.randint(0, 64, (n, k), generator=gen)
        q[:, :2] = 0  # the first group of every row reaches ±32
        sign = torch.where(signed < 0, -1, 1).repeat_interleave(group, dim=1)
        codes, ints = (sign * (q - 32)).to(torch.int8), signed.abs().to(torch.uint8)
    if two_bit:
        codes = torch.randint(0, 4, (n, k), dtype=torch.int8, generator=gen)
    if three_bit:
        signed = torch.randint(-32, 32, (n, k // group), generator=gen)
        signed[0, :3] = torch.tensor([-32, 31, 0])  # the ends of Q3_K's scales
        q = torch.randint(-4, 4, (n, k), generator=gen)
        q[:, :2] = -4  # the first group of every row reaches ±4
        sign = torch.where(signed < 0, -1, 1).repeat_interleave(group, dim=1)
        codes, ints = (sign * q).to(torch.int8), signed.abs().to(torch.uint8)
    if scale_dtype == torch.uint8:
        scale = factored_table(ints, (torch.rand(n, k // group // 8, generator=gen) * 1e-3).half())
    else:
        scale = (torch.rand(n, k // group, generator=gen) * 0.02).to(scale_dtype)
    zero = None
    if zero_dtype == torch.uint8:
        zero = factored_table(torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=gen),
                              -(torch.rand(n, k // group // 8, generator=gen) * 1e-3).half())
    elif zero_dtype is not None:
        zero = (torch.randn(n, k // group, generator=gen) * 0.01).to(zero_dtype)
    return tuple(GroupQuantWeight(codes.clone(), scale.clone(), None if zero is None else zero.clone(), bits=8,
                                  group=group, int8_activations=True) for _ in range(2))


# 72 rows: a last tile of 8 (padded in a new tensor); 64: whole tiles, rearranged in place; factored
# scales (IQ4_XS's in groups of 32, Q6_K's in groups of 16); groups of 16, 34 of them a row
# 6-bit tiles: Q6_K's form (factored, groups of 16), and narrow codes beside float scales in groups of 32;
# zeros (float16, factored) beside 8-bit codes, and Q2_K's form: codes 0..3, factored scale and zero;
# 3-bit tiles: Q3_K's form (factored, groups of 16), and narrow codes beside float scales in groups of 32
@pytest.mark.parametrize("n,k,scale_dtype,group,six_bit,zero_dtype,two_bit,three_bit", [
    (72, 320, torch.float16, 32, False, None, False, False), (64, 640, torch.float32, 32, False, None, False, False),
    (1000, 96, torch.float16, 32, False, None, False, False), (64, 512, torch.uint8, 32, False, None, False, False),
    (72, 512, torch.uint8, 16, False, None, False, False), (40, 544, torch.float32, 16, False, None, False, False),
    (72, 512, torch.uint8, 16, True, None, False, False), (300, 256, torch.uint8, 16, True, None, False, False),
    (40, 544, torch.float16, 32, True, None, False, False), (72, 320, torch.float16, 32, False, torch.float16, False, False),
    (40, 512, torch.uint8, 16, True, torch.uint8, False, False), (72, 512, torch.uint8, 16, False, torch.uint8, True, False),
    (300, 256, torch.float16, 32, False, torch.float32, True, False),
    (72, 512, torch.uint8, 16, False, None, False, True), (300, 256, torch.uint8, 16, False, None, False, True),
    (40, 544, torch.float16, 32, False, None, False, True)])
def test_tiles_give_the_row_major_numbers(n, k, scale_dtype, group, six_bit, zero_dtype, two_bit, three_bit):
    rows, tiled = weight_pair(n, k, scale_dtype, seed=n, group=group, six_bit=six_bit, zero_dtype=zero_dtype,
                              two_bit=two_bit, three_bit=three_bit)
    stored = tiled.to_wide_tiles()
    assert stored == (ops.wide_tile_lanes() == 16)
    assert tiled.to_wide_tiles() is False  # once
    if stored:  # bytes a span of a tile: 64 a bit
        assert tiled.codes.shape[2] == 64 * (2 if two_bit else 3 if three_bit else 6 if six_bit else 8)
    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 3, 5, 16, 32, 33, 130):  # the GEMV's and every GEMM's row counts of the row-major form
        x = torch.randn(m, k, generator=gen) * 3
        assert torch.equal(tiled.kernel(x), rows.kernel(x)), m
    ids = torch.tensor([0, n - 1, 17, n // 2, 17])
    assert torch.equal(tiled.rows(ids, torch.float32), rows.rows(ids, torch.float32))
    assert torch.equal(tiled.dequantize(), rows.dequantize())
    assert torch.equal(tiled.dequantize(3, 40), rows.dequantize(3, 40))
    # a 6- or 3-bit tile moves a group's sign from its codes to its scale
    assert torch.equal(tiled.scale_values().abs(), rows.scale_values().abs())
    assert torch.equal(tiled.int_codes() * tiled.scale_values().sign()[..., None],
                       rows.int_codes() * rows.scale_values().sign()[..., None])
    if zero_dtype is not None:
        assert torch.equal(tiled.zero_values(), rows.zero_values())
    if stored:
        with pytest.raises(ValueError, match="int8 activations"):
            tiled.set_int8_activations(False)


def test_codes_that_need_7_bits_stay_in_8_bit_tiles():
    """-32 and +32 in one group, or a factored integer of 129 or more, leave no sign for 6 bits."""
    for bad in ("both ends", "integer"):
        rows, tiled = weight_pair(32, 256, torch.uint8, seed=5, group=16, six_bit=True)
        if bad == "both ends":
            tiled.codes[7, 16:18] = torch.tensor([-32, 32], dtype=torch.int8).view(torch.uint8)
        else:
            tiled.scale[7, 3] = 200
        assert tiled.to_wide_tiles() == (ops.wide_tile_lanes() == 16)
        if tiled.tiled:
            assert tiled.codes.shape[2] == 512, bad


def test_codes_that_need_4_bits_take_6_bit_tiles():
    """Q3_K's form with -4 and +4 in one group leaves no sign for 3 bits: the next width that holds them."""
    rows, tiled = weight_pair(32, 256, torch.uint8, seed=6, group=16, three_bit=True)
    tiled.codes[7, 16:18] = torch.tensor([-4, 4], dtype=torch.int8).view(torch.uint8)
    rows.codes[7, 16:18] = torch.tensor([-4, 4], dtype=torch.int8).view(torch.uint8)
    assert tiled.to_wide_tiles() == (ops.wide_tile_lanes() == 16)
    if tiled.tiled:
        assert tiled.codes.shape[2] == 384
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tiled.kernel(x), rows.kernel(x))


def test_weights_on_float_activations_stay_by_rows():
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=gen)
    scale = torch.rand(32, 2, generator=gen).half()
    eight_bit = GroupQuantWeight(codes, scale, None, bits=8, int8_activations=False)
    four_bit = GroupQuantWeight(codes.abs().clamp(max=15).to(torch.uint8), scale, None, bits=4, int8_activations=False)
    assert not any(w.to_wide_tiles() for w in (eight_bit, four_bit))
    assert not any(w.tiled for w in (eight_bit, four_bit))


def test_the_engine_stores_its_head_in_tiles(smollm2_gguf, smollm2_default_llm):
    """SmolLM2's head is its Q8_0 embedding (tied): stored in tiles where the build has them, and its
    rows still dequantize to what gguf-py reads from the file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    head = smollm2_default_llm.engine.runner.model.head_weight()
    assert head.tiled == (ops.wide_tile_lanes() == 16)
    table = next(t for t in GGUFReader(smollm2_gguf).tensors if t.name == "token_embd.weight")
    ids = [0, 1, 4097, 49151]
    want = dequantize(np.asarray(table.data)[ids], table.tensor_type)
    got = smollm2_default_llm.engine.runner.model.model.embed_tokens(torch.tensor(ids))
    assert torch.equal(got.float(), torch.from_numpy(want).float())
