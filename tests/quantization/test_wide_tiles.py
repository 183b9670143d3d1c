"""8-bit weights stored in the tiled GEMM's own order (GroupQuantWeight.to_wide_tiles): on a build with
16-lane tiles (AVX-512) every M gives the row-major kernel's numbers bit for bit, and row lookups,
dequantization and scales read back what was stored; a build without them keeps the weight by rows.
The engine stores its LM head so, and its tied embedding rows stay gguf-py's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flashserve.kernels import ops
from flashserve.quantization.gguf_bits import IQ4_LEVELS
from flashserve.quantization.group_quant_weight import GroupQuantWeight, factored_table


SPAN_BYTES = {"8-bit": 512, "Q6_K": 384, "Q3_K": 192, "Q2_K": 128, "IQ4": 256, "IQ2": 256, "16 values": 256}


def weight_pair(n: int, k: int, scale_dtype: torch.dtype, seed: int, group: int = 32, form: str = "8-bit",
                zero_dtype: torch.dtype | None = None) -> tuple[GroupQuantWeight, GroupQuantWeight]:
    """The same random 8-bit weight twice: by rows, and to be tiled (its own copy of the codes). A
    uint8 scale_dtype: a factored table, whose values the tiles hold. form: "8-bit" any codes; "Q6_K"
    its form as gguf_int8_forms makes it, codes ±(q - 32) with q in 0..63 and the sign of the group's
    int8 scale (-128..127; its magnitude in the table), so some groups reach +32, others -32; "Q3_K" the
    same with q in -4..3 and scales in -32..31; "IQ4" IQ4_XS's, codes ±level (its 16 non-uniform levels)
    with the sign of scales in -32..31; "Q2_K" codes 0..3; "IQ2" IQ2_*'s codes ±8, ±25, ±43; "16 values" any
    16 distinct codes, -128 and 127 among them. zero_dtype: a zero table too (uint8: factored, as Q2_K's
    -dmin * mn)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    ints = torch.randint(0, 129, (n, k // group), dtype=torch.uint8, generator=gen)
    if form in ("Q6_K", "Q3_K", "IQ4"):
        top = 128 if form == "Q6_K" else 32
        signed = torch.randint(-top, top, (n, k // group), generator=gen)
        signed[0, :3] = torch.tensor([-top, top - 1, 0])  # the ends of the scales (|-128| is 128 in the table)
        if form == "Q6_K":
            q = torch.randint(0, 64, (n, k), generator=gen) - 32
            q[:, :2] = -32  # the first group of every row reaches ±32
        elif form == "Q3_K":
            q = torch.randint(-4, 4, (n, k), generator=gen)
            q[:, :2] = -4  # and ±4
        else:
            q = IQ4_LEVELS[torch.randint(0, 16, (n, k), generator=gen)].to(torch.int64)
            q[:, :2] = IQ4_LEVELS[0]  # and ±127, whose negative is no level
        sign = torch.where(signed < 0, -1, 1).repeat_interleave(group, dim=1)
        codes, ints = (sign * q).to(torch.int8), signed.abs().to(torch.uint8)
    if form == "Q2_K":
        codes = torch.randint(0, 4, (n, k), dtype=torch.int8, generator=gen)
    if form in ("IQ2", "16 values"):
        values = (torch.tensor([-43, -25, -8, 8, 25, 43]) if form == "IQ2" else
                  torch.cat([torch.tensor([-128, 127]), torch.randperm(254, generator=gen)[:14] - 126]))
        codes = values[torch.randint(0, len(values), (n, k), generator=gen)].to(torch.int8)
        codes[-1, :len(values)] = values.to(torch.int8)  # every value in the last row (where a tile pads)
        ints = ints.clamp(max=127)  # an integer of 128 must go negative in int8: the codes' negatives are no values
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
# 3-bit tiles: Q3_K's form (factored, groups of 16), and narrow codes beside float scales in groups of 32;
# 4-bit indices: IQ4_XS's form (factored, groups of 32), and levels beside float16 scales (IQ4_NL's);
# into the weight's own values: IQ2_*'s (float32 scales, groups of 32 and 16), any 16;
# narrowings in several chunks of tiles, the last one short (the kernels' buffer holds ~1024 spans)
@pytest.mark.parametrize("n,k,scale_dtype,group,form,zero_dtype", [
    (72, 320, torch.float16, 32, "8-bit", None), (64, 640, torch.float32, 32, "8-bit", None),
    (1000, 96, torch.float16, 32, "8-bit", None), (64, 512, torch.uint8, 32, "8-bit", None),
    (72, 512, torch.uint8, 16, "8-bit", None), (40, 544, torch.float32, 16, "8-bit", None),
    (72, 512, torch.uint8, 16, "Q6_K", None), (300, 256, torch.uint8, 16, "Q6_K", None),
    (40, 544, torch.float16, 32, "Q6_K", None), (72, 320, torch.float16, 32, "8-bit", torch.float16),
    (40, 512, torch.uint8, 16, "Q6_K", torch.uint8), (72, 512, torch.uint8, 16, "Q2_K", torch.uint8),
    (300, 256, torch.float16, 32, "Q2_K", torch.float32),
    (72, 512, torch.uint8, 16, "Q3_K", None), (300, 256, torch.uint8, 16, "Q3_K", None),
    (40, 544, torch.float16, 32, "Q3_K", None),
    (72, 512, torch.uint8, 32, "IQ4", None), (300, 256, torch.uint8, 32, "IQ4", None),
    (40, 544, torch.float16, 32, "IQ4", None), (72, 512, torch.float32, 32, "IQ2", None),
    (40, 544, torch.float32, 16, "IQ2", None), (300, 256, torch.float16, 32, "16 values", None),
    (72, 512, torch.uint8, 16, "16 values", None), (2008, 512, torch.uint8, 16, "Q6_K", None),
    (1400, 1024, torch.uint8, 16, "Q3_K", None), (1800, 512, torch.uint8, 32, "IQ4", None)])
def test_tiles_give_the_row_major_numbers(n, k, scale_dtype, group, form, zero_dtype):
    rows, tiled = weight_pair(n, k, scale_dtype, seed=n, group=group, form=form, zero_dtype=zero_dtype)
    stored = tiled.to_wide_tiles()
    assert stored == (ops.wide_tile_lanes() == 16)
    assert tiled.to_wide_tiles() is False  # once
    if stored:  # bytes a span of a tile: 64 a bit
        assert tiled.codes.shape[2] == SPAN_BYTES[form]
        assert (tiled.tile_levels is not None) == (form in ("IQ4", "IQ2", "16 values"))
    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 3, 5, 16, 32, 33, 130):  # the GEMV's and every GEMM's row counts of the row-major form
        x = torch.randn(m, k, generator=gen) * 3
        assert torch.equal(tiled.kernel(x), rows.kernel(x)), m
    ids = torch.tensor([0, n - 1, 17, n // 2, 17])
    assert torch.equal(tiled.rows(ids, torch.float32), rows.rows(ids, torch.float32))
    assert torch.equal(tiled.dequantize(), rows.dequantize())
    assert torch.equal(tiled.dequantize(3, 40), rows.dequantize(3, 40))
    # a narrow tile moves a group's sign from its codes to its scale
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
        rows, tiled = weight_pair(32, 256, torch.uint8, seed=5, group=16, form="Q6_K")
        if bad == "both ends":
            tiled.codes[7, 16:18] = torch.tensor([-32, 32], dtype=torch.int8).view(torch.uint8)
        else:
            tiled.scale[7, 3] = 200
        assert tiled.to_wide_tiles() == (ops.wide_tile_lanes() == 16)
        if tiled.tiled:
            assert tiled.codes.shape[2] == 512, bad


def test_codes_that_need_4_bits_take_the_next_width():
    """Q3_K's form with -4 and +4 in one group leaves no sign for 3 bits: the next width that holds them,
    4-bit indices into its 9 values."""
    rows, tiled = weight_pair(32, 256, torch.uint8, seed=6, group=16, form="Q3_K")
    tiled.codes[7, 16:18] = torch.tensor([-4, 4], dtype=torch.int8).view(torch.uint8)
    rows.codes[7, 16:18] = torch.tensor([-4, 4], dtype=torch.int8).view(torch.uint8)
    assert tiled.to_wide_tiles() == (ops.wide_tile_lanes() == 16)
    if tiled.tiled:
        assert tiled.codes.shape[2] == 256 and len(tiled.tile_levels.unique()) == 9
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tiled.kernel(x), rows.kernel(x))


def test_codes_beside_levels_take_8_bit_tiles():
    """IQ4's form with one code that is no level (nor its negative), 17 distinct codes: no indices, and no
    narrower width."""
    rows, tiled = weight_pair(32, 256, torch.uint8, seed=7, form="IQ4")
    tiled.codes[5, 40] = rows.codes[5, 40] = 2
    assert tiled.to_wide_tiles() == (ops.wide_tile_lanes() == 16)
    if tiled.tiled:
        assert tiled.codes.shape[2] == 512 and tiled.tile_levels is None
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
