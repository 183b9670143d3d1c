"""The i-quants' weights (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) in the file's own bytes (quantization/codebook_weight.py) against gguf-py's
dequantization and against the exact 8-bit form of the same blocks (gguf_codebook_forms.py, a second
code path): the values bit for bit, the tiled kernel's numbers bit for bit at every M, the bytes
held those of the file; merged with other types, split for tensor parallelism, and a whole model
whose decode plan and modules compute what the exact 8-bit forms compute. Random valid blocks
(every grid index, sign pattern and scale); the real blocks llama.cpp writes are in
test_llama_written_types.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from flashserve.distributed.weight_shards import cols_of, rows_of
from flashserve.quantization import codebook_weight, gguf_method
from flashserve.quantization.codebook_weight import CodebookWeight, grid_words
from flashserve.quantization.gguf_method import pack_embedding, pack_linear
from flashserve.quantization.group_quant_weight import GroupQuantWeight
from flashserve.quantization.packed import RowSegments
from tests.quantization.test_exact_int8_forms import gguf_py, random_blocks

pytestmark = pytest.mark.usefixtures("cpp_kernels")
TYPES = [Q.IQ2_XXS, Q.IQ3_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M]
TILES = codebook_weight.available()  # the 16-lane tiles (AVX-512): elsewhere these types keep the 8-bit form


def exact(t) -> GroupQuantWeight:
    """The same blocks as exact 8-bit codes (what the embedding takes, and linears without the tiles)."""
    w = pack_embedding(t, own_kernels=True)
    w.set_int8_activations(True)
    return w


@pytest.mark.parametrize("qtype", TYPES)
def test_grid_words_name_the_grid(qtype):
    """The kernel's table (a word of indices a grid entry, and the values' codes) decoded by hand gives
    gguf-py's grid: the exact form's code of each entry value, positive (or IQ1's delta +1/8) with index bit
    3 clear, negative (or delta -1/8) with it set."""
    kind = getattr(quants, qtype.name)
    kind.init_grid()
    grid = torch.from_numpy(np.asarray(kind.grid).astype(np.int64))
    grid = grid.reshape(-1, grid.shape[-1])  # (entries, 8 or 4)
    words, codes = grid_words(qtype.name)
    nibbles = (words.long()[:len(grid), None] >> (4 * torch.arange(4))) & 15
    fields = torch.cat([nibbles & 3, nibbles >> 2], dim=1) if grid.shape[1] == 8 else nibbles  # values j, j + 4
    iq1 = qtype.name.startswith("IQ1")
    assert torch.equal(codes[fields].long() - 128, 8 * grid + 1 if iq1 else grid)
    assert torch.equal(codes[fields + 8].long() - 128, 8 * grid - 1 if iq1 else -grid)
    assert len(words) == len(grid) and len(set(words.tolist())) == len(grid)  # one word an entry, distinct


def test_the_type_is_held_in_its_own_blocks_only_where_the_tiles_are():
    t = random_blocks(Q.IQ2_XXS, 32, 512)
    w = pack_linear([t], torch.float32, own_kernels=True)
    assert isinstance(w, CodebookWeight if TILES else GroupQuantWeight)


@pytest.mark.skipif(not TILES, reason="the build has no 16-lane tiles (AVX-512): these types stay 8-bit codes")
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [64, 70])
def test_the_weight_holds_the_files_bytes_and_values(qtype, rows):
    t = random_blocks(qtype, rows, 768, seed=rows)
    want = gguf_py(t)
    w = CodebookWeight(qtype.name, t.block_bytes())
    w.set_int8_activations(True)
    assert torch.equal(w.dequantize(), want) and torch.equal(w.dequantize(5, 40), want[5:40])
    assert w.to_wide_tiles() and w.blocks is None
    assert torch.equal(w.dequantize(), want) and torch.equal(w.dequantize(5, 40), want[5:40])
    assert torch.equal(w.row_blocks(slice(None)).reshape(rows, -1), t.block_bytes())  # the tiles undo
    held = w.codes.nbytes + w.d.nbytes + w.side.nbytes
    padded, blocks = -(-rows // 16) * 16, 768 // 256
    # beyond the file's bytes, per block of a row: the grids looked up when stored hold 32 grid words where the
    # file has 32 index bytes; IQ1_M's d apart as well
    extra = {"IQ2_S": 32, "IQ1_S": 32, "IQ1_M": 34}.get(qtype.name, 0)
    assert held == (t.raw.nbytes // rows + extra * blocks) * padded  # rows padded to whole tiles
    assert torch.equal(w.int_codes(), exact(t).int_codes()) and torch.equal(w.scale_values(), exact(t).scale_values())


@pytest.mark.skipif(not TILES, reason="the build has no 16-lane tiles (AVX-512): these types stay 8-bit codes")
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 20, 45])  # one row, a few (a verification step), a batch, a prompt
def test_the_kernel_computes_what_the_exact_form_computes(qtype, m):
    """Bit for bit the 8-bit codes' kernel, by rows and in its own tiles (4-bit indices into the grid's
    values), on the 8-bit tiles' float order: the integer dots are the same, so are the sums."""
    t = random_blocks(qtype, 70, 1024, seed=m, magnitude=1e-3)
    by_rows, tiled = (CodebookWeight(qtype.name, t.block_bytes()) for _ in range(2))
    for w in (by_rows, tiled):
        w.set_int8_activations(True)
    assert tiled.to_wide_tiles() and not by_rows.tiled
    ref_rows, ref_tiles = exact(t), exact(t)
    assert ref_tiles.to_wide_tiles()
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)) * 3
    want = ref_rows(x)
    assert torch.equal(ref_tiles(x), want)
    assert torch.equal(tiled(x), want) and torch.equal(by_rows(x), want)


@pytest.mark.skipif(not TILES, reason="the build has no 16-lane tiles (AVX-512): these types stay 8-bit codes")
@pytest.mark.parametrize("qtype", TYPES)
def test_float_activations_take_the_files_values(qtype):
    """quantization="weight-only": x is not rounded; every M multiplies gguf-py's weight."""
    t = random_blocks(qtype, 40, 512, magnitude=1e-3)
    w = pack_linear([t], torch.float32, own_kernels=True)
    assert not w.int8_activations
    for m in (1, 3, 300):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
        assert torch.equal(w(x), x @ gguf_py(t).t())  # one float32 GEMM on the file's values


@pytest.mark.skipif(not TILES, reason="the build has no 16-lane tiles (AVX-512): these types stay 8-bit codes")
def test_merged_parts_keep_their_own_forms_and_split_for_tensor_parallel():
    """q|k|v of IQ2_XXS, IQ2_XXS and Q5_K: the first two one weight in their blocks, the third 8-bit codes;
    rows and columns of a codebook weight (whole blocks) for tensor-parallel ranks."""
    parts = [random_blocks(q, 32 * (i + 1), 512, seed=i) for i, q in enumerate([Q.IQ2_XXS, Q.IQ2_XXS, Q.Q5_K])]
    w = pack_linear(parts, torch.float32, own_kernels=True)
    assert isinstance(w, RowSegments) and [type(p) for p in w.parts] == [CodebookWeight, GroupQuantWeight]
    want = torch.cat([gguf_py(p) for p in parts])
    assert torch.equal(w.dequantize(), want)
    first = w.parts[0]
    assert torch.equal(rows_of(first, [(3, 9), (40, 44)]).dequantize(), torch.cat([want[3:9], want[40:44]]))
    assert torch.equal(cols_of(first, 256, 512).dequantize(), want[:96, 256:512])
    with pytest.raises(ValueError, match="256-value blocks"):
        cols_of(first, 0, 288)


@pytest.mark.skipif(not TILES, reason="the build has no 16-lane tiles (AVX-512): these types stay 8-bit codes")
def test_bad_tiles_are_refused_with_what_is_wrong():
    from flashserve.kernels import ops

    with pytest.raises(ValueError, match=r"IQ2_XXS weight: blocks \(4, 65\) are not rows of 66-byte blocks"):
        CodebookWeight("IQ2_XXS", torch.zeros(4, 65, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one of IQ2_XXS, .*IQ1_M, not TQ2_0"):
        CodebookWeight("TQ2_0", torch.zeros(4, 66, dtype=torch.uint8))
    w = CodebookWeight("IQ2_XXS", random_blocks(Q.IQ2_XXS, 16, 512).block_bytes())
    w.set_int8_activations(True)
    w.to_wide_tiles()
    x = torch.zeros(1, 512)
    with pytest.raises(RuntimeError, match="IQ2_XXS's grid must be 256 int16 words"):
        ops.codebook_matmul_tiles(x, w.codes, w.d, w.side, w.grid[:100], w.grid_codes, "IQ2_XXS", 16)
    with pytest.raises(RuntimeError, match="are not IQ2_XXS tiles of 16 rows of 256"):
        ops.codebook_matmul_tiles(torch.zeros(1, 256), w.codes, w.d, w.side, w.grid, w.grid_codes, "IQ2_XXS", 16)
    with pytest.raises(RuntimeError, match="are not IQ3_XXS tiles"):  # 2 planes a span where IQ3_XXS has 3
        ops.codebook_matmul_tiles(x, w.codes, w.d, w.side, *grid_words("IQ3_XXS"), "IQ3_XXS", 16)
    with pytest.raises(RuntimeError, match=r"side \[1, 2, 0, 16\] is not uint8 \(1, 2, 8, 16\)"):
        ops.codebook_matmul_tiles(x, w.codes, w.d, w.side, *grid_words("IQ2_XS"), "IQ2_XS", 16)
    with pytest.raises(RuntimeError, match="no codebook type Q4_0"):
        ops.codebook_matmul_tiles(x, w.codes, w.d, w.side, w.grid, w.grid_codes, "Q4_0", 16)


def tiny_qwen2(tmp_path, types: dict[str, str]):
    """A 2-layer Qwen2 of rows of 256 and 512 whose linears are random valid blocks of `types`."""
    import transformers as tf

    from tests.model.tiny import write_gguf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    seeds = iter(range(1000))

    def encode(a: np.ndarray, qtype: Q) -> np.ndarray:
        return random_blocks(qtype, a.shape[0], a.shape[1], seed=next(seeds), magnitude=2e-3 / 8).raw

    return write_gguf(tf.Qwen2ForCausalLM(cfg).eval(), tmp_path / "m.gguf", qtype="F32", qtype_of=types, encode=encode)


MODEL_TYPES = {  # per layer (q, k, o, gate, up, down), the head; and how many codebook weights the model holds
    "xxs": (("IQ2_XXS", "IQ2_XXS", "IQ3_XXS", "IQ2_XXS", "IQ2_XXS", "IQ3_XXS"), "IQ3_XXS", 9),  # q|k, o, gate|up, down
    # each type a segment of its own (q, k; gate, up); merged parts of one group size (32: q, k and the Q8_0 v;
    # 16: gate, up), as the exact forms would merge them into one
    "others": (("IQ3_S", "IQ1_S", "IQ2_S", "IQ1_M", "IQ2_XS", "IQ3_S"), "IQ1_M", 13),
}


@pytest.mark.skipif(not TILES, reason="the build has no 16-lane tiles (AVX-512): these types stay 8-bit codes")
@pytest.mark.parametrize("mix", MODEL_TYPES)
def test_a_model_in_its_own_blocks_computes_what_the_exact_forms_compute(tmp_path, monkeypatch, mix):
    """Every linear an i-quant (q|k|v merged with a Q8_0 v): the modules and the C++ decode plan over
    codebook tiles give the hidden states the same model on the exact 8-bit forms gives, bit for bit,
    prompt and decode steps."""
    from flashserve.model.loader import load_model
    from flashserve.runner.decode_plan import build_decode_plan
    from flashserve.runner.kv_cache import allocate_kv_caches
    from tests.model.test_decode_plan import BLOCK, step

    layer, head, held = MODEL_TYPES[mix]
    names = ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    types = {f"blk.{i}.{name}": q for i in range(2) for name, q in zip(names, layer)}
    types |= {f"blk.{i}.attn_v": "Q8_0" for i in range(2)} | {"output": head}
    path = str(tiny_qwen2(tmp_path, types))

    def load():
        model, cfg = load_model(path, torch.float32, quantization="auto")
        for m in model.modules():
            if isinstance(m, (GroupQuantWeight, CodebookWeight)):
                m.to_wide_tiles()
        model.bind_kv_caches(allocate_kv_caches(cfg, num_blocks=40, block_size=BLOCK, dtype=torch.float32,
                                                device=torch.device("cpu")))
        return model

    own = load()
    assert sum(isinstance(m, CodebookWeight) and m.tiled for m in own.modules()) == held
    monkeypatch.setattr(gguf_method, "codebook_tiles_available", lambda: False)
    monkeypatch.setattr(gguf_method, "AFFINE4_TYPES", frozenset())  # IQ3_S, IQ1_S: their exact 8-bit form too
    eight_bit = load()
    assert not any(isinstance(m, CodebookWeight) for m in eight_bit.modules())
    plan = build_decode_plan(own)
    assert plan is not None
    g = torch.Generator().manual_seed(0)
    seqs = {rid: torch.randint(0, 256, (n,), generator=g).tolist() for rid, n in {"a": 5, "b": 11}.items()}
    tables = {rid: list(range(1 + 12 * i, 13 + 12 * i)) for i, rid in enumerate(seqs)}
    done = dict.fromkeys(seqs, 0)
    assert torch.equal(step(own, seqs, done, tables), step(eight_bit, seqs, done, tables))  # the prompts
    for _ in range(4):
        done = {rid: len(t) for rid, t in seqs.items()}
        for rid in seqs:
            seqs[rid].append(int(torch.randint(0, 256, (1,), generator=g)))
        want = step(eight_bit, seqs, done, tables)
        assert torch.equal(step(own, seqs, done, tables), want)
        assert torch.equal(step(own, seqs, done, tables, plan), want)


@pytest.mark.skipif(not TILES, reason="the build has no 16-lane tiles (AVX-512): these types stay 8-bit codes")
def test_streamed_layers_in_their_own_blocks_compute_the_resident_models_numbers(tmp_path, monkeypatch):
    """Layer streaming (max_weight_memory) keeps the codebook weights by rows, as its packed-layer file holds
    them, and tiles them per call: the resident model's hidden states, bit for bit."""
    from flashserve.model.loader import load_model
    from flashserve.offload.layer_streaming import resident_bytes
    from flashserve.runner.kv_cache import allocate_kv_caches
    from tests.model.test_decode_plan import BLOCK, step

    types = {f"blk.{i}.{name}": "IQ2_XXS" for i in range(2) for name in ("attn_q", "attn_k", "attn_v")}
    types |= {f"blk.{i}.{name}": q for i in range(2) for name, q in [
        ("attn_output", "IQ3_XXS"), ("ffn_gate", "IQ1_M"), ("ffn_up", "IQ1_M"), ("ffn_down", "IQ3_S")]}
    path = str(tiny_qwen2(tmp_path, types))
    monkeypatch.setenv("FLASHSERVE_CACHE", str(tmp_path / "cache"))  # the packed-layer file of a throwaway model

    def load(budget):
        model, cfg = load_model(path, torch.float32, quantization="auto", max_weight_memory=budget)
        model.bind_kv_caches(allocate_kv_caches(cfg, num_blocks=40, block_size=BLOCK, dtype=torch.float32,
                                                device=torch.device("cpu")))
        return model

    resident = load(None)
    for m in resident.modules():
        if isinstance(m, CodebookWeight):
            m.to_wide_tiles()
    probe = load(1 << 40)
    layer = max(sum(p.nbytes for p in x.parameters() if p is not None) for x in probe.model.layers)
    streamed = load(resident_bytes(probe) + 1024 + layer)
    assert streamed.layer_streamer is not None
    assert any(isinstance(m, CodebookWeight) for m in streamed.modules())
    g = torch.Generator().manual_seed(0)
    seqs = {"a": torch.randint(0, 256, (9,), generator=g).tolist()}
    tables = {"a": list(range(1, 13))}
    for done in (0, 9):
        if done:
            seqs["a"].append(3)
        assert torch.equal(step(streamed, seqs, {"a": done}, tables), step(resident, seqs, {"a": done}, tables))
