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


def weight_pair(n: int, k: int, scale_dtype: torch.dtype, seed: int,
                group: int = 32) -> tuple[GroupQuantWeight, GroupQuantWeight]:
    """The same random 8-bit weight twice: by rows, and to be tiled (its own copy of the codes). A
    uint8 scale_dtype: a factored table (Q6_K's form), whose values the tiles hold."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    if scale_dtype == torch.uint8:
        scale = factored_table(torch.randint(0, 129, (n, k // group), dtype=torch.uint8, generator=gen),
                               (torch.rand(n, k // group // 8, generator=gen) * 1e-3).half())
    else:
        scale = (torch.rand(n, k // group, generator=gen) * 0.02).to(scale_dtype)
    return (GroupQuantWeight(codes, scale, None, bits=8, group=group, int8_activations=True),
            GroupQuantWeight(codes.clone(), scale.clone(), None, bits=8, group=group, int8_activations=True))


# 72 rows: a last tile of 8 (padded in a new tensor); 64: whole tiles, rearranged in place; factored
# scales (IQ4_XS's in groups of 32, Q6_K's in groups of 16); groups of 16, 34 of them a row
@pytest.mark.parametrize("n,k,scale_dtype,group", [(72, 320, torch.float16, 32), (64, 640, torch.float32, 32),
                                                   (1000, 96, torch.float16, 32), (64, 512, torch.uint8, 32),
                                                   (72, 512, torch.uint8, 16), (40, 544, torch.float32, 16)])
def test_tiles_give_the_row_major_numbers(n, k, scale_dtype, group):
    rows, tiled = weight_pair(n, k, scale_dtype, seed=n, group=group)
    stored = tiled.to_wide_tiles()
    assert stored == (ops.wide_tile_lanes() == 16)
    assert tiled.to_wide_tiles() is False  # once
    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 3, 5, 16, 32, 33, 130):  # the GEMV's and every GEMM's row counts of the row-major form
        x = torch.randn(m, k, generator=gen) * 3
        assert torch.equal(tiled.kernel(x), rows.kernel(x)), m
    ids = torch.tensor([0, n - 1, 17, n // 2, 17])
    assert torch.equal(tiled.rows(ids, torch.float32), rows.rows(ids, torch.float32))
    assert torch.equal(tiled.dequantize(), rows.dequantize())
    assert torch.equal(tiled.dequantize(3, 40), rows.dequantize(3, 40))
    assert torch.equal(tiled.scale_values(), rows.scale_values())
    if stored:
        with pytest.raises(ValueError, match="int8 activations"):
            tiled.set_int8_activations(False)


def test_only_what_the_tiled_kernel_takes_is_stored_in_tiles():
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=gen)
    scale = torch.rand(32, 2, generator=gen).half()
    with_zero = GroupQuantWeight(codes, scale, scale.clone(), bits=8, int8_activations=True)
    float_activations = GroupQuantWeight(codes, scale, None, bits=8, int8_activations=False)
    four_bit = GroupQuantWeight(codes.abs().clamp(max=15).to(torch.uint8), scale, None, bits=4, int8_activations=True)
    assert not any(w.to_wide_tiles() for w in (with_zero, float_activations, four_bit))
    assert not any(w.tiled for w in (with_zero, float_activations, four_bit))


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
