"""GGUF types held exactly as 8-bit codes (quantization/gguf_int8_forms.py) against gguf-py's
dequantization, bit for bit, on random valid blocks (finite float16 factors, random bytes elsewhere:
every code and scale pattern); through the C++ kernel against x @ w.T; merged parts of different
types; a real Q6_K tensor; and a tiny Qwen2 file of these types against transformers reading it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q

from flashserve.quantization import codebook_weight
from flashserve.quantization.codebook_weight import BLOCK_BYTES as CODEBOOK_TYPES
from flashserve.quantization.codebook_weight import CodebookWeight
from flashserve.quantization.gguf_blocks import GGUFTensor
from flashserve.quantization.gguf_int8_forms import GROUPS, Int8Form, exact_int8, merged
from flashserve.quantization.gguf_method import AFFINE4_TYPES, pack_embedding, pack_linear
from flashserve.quantization.group_quant_weight import GroupQuantWeight
from tests.model.test_quant_linear import check_matmul

# Byte offsets of each block's float16 factors (ggml-common.h: block_q5_1, block_q5_K, block_q6_K,
# block_q3_K, block_iq4_nl, block_iq4_xs, block_q8_0, block_q2_K, block_tq*, block_iq3/2/1_*), the rest
# of a block being any bytes (every grid index, sign pattern and sub-block scale); IQ1_M's d is the top
# nibbles of its four u16 scales (random_blocks puts it there).
HALF_FIELDS = {Q.Q5_1: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q3_K: (108,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
               Q.Q8_0: (0,), Q.Q2_K: (80, 82), Q.TQ2_0: (64,), Q.TQ1_0: (52,), Q.IQ1_M: ()} | {
               q: (0,) for q in (Q.IQ3_XXS, Q.IQ3_S, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_S)}
# group, and bits per weight: 8-bit codes, the scale table (and zero table) per group; scales of
# d / 4, d / 2 or d / 8 times an integer are float32 (a float16 factor d / 8 would round)
LAYOUT = {Q.Q5_1: (32, 9.0), Q.Q5_K: (32, 8.625), Q.Q6_K: (16, 8.625), Q.Q3_K: (16, 8.625),
          Q.IQ4_NL: (32, 8.5), Q.IQ4_XS: (32, 8.3125), Q.Q2_K: (16, 9.25), Q.IQ3_S: (32, 8.3125),
          Q.IQ3_XXS: (32, 9.0), Q.IQ2_XXS: (32, 9.0), Q.IQ2_XS: (16, 10.0), Q.IQ2_S: (16, 10.0),
          Q.IQ1_S: (32, 9.0), Q.IQ1_M: (16, 10.0), Q.TQ2_0: (32, 8.5), Q.TQ1_0: (32, 8.5)}
NEW = list(LAYOUT)


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0, magnitude: float | None = None) -> GGUFTensor:
    """Random bytes with finite float16 factors: of either sign over a wide range, or of about
    `magnitude` (model-sized weights)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rows * cols // block
    raw = rng.integers(0, 256, (blocks, size), dtype=np.uint8)

    def factors() -> np.ndarray:
        if magnitude is None:
            return (rng.standard_normal(blocks) * 10.0 ** rng.integers(-4, 2, blocks)).astype(np.float16)
        return (rng.uniform(0.5, 1.5, blocks) * magnitude).astype(np.float16)

    for offset in HALF_FIELDS[qtype]:
        raw[:, offset : offset + 2] = factors().view(np.uint8).reshape(blocks, 2)
    if qtype == Q.IQ1_M:  # d's nibble i is the top nibble of scale i (bytes 48..55)
        d = factors().view(np.uint16)
        scales = raw[:, 48:56].copy().view(np.uint16)
        for i in range(4):
            scales[:, i] = (scales[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        raw[:, 48:56] = scales.view(np.uint8)
    return GGUFTensor(raw.reshape(rows, -1), qtype, (rows, cols))


def gguf_py(t: GGUFTensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(quants.dequantize(t.raw, t.qtype), np.float32).reshape(t.shape))


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("qtype", NEW)
def test_packed_weight_is_the_file_bit_for_bit(qtype):
    """codes * scale (+ zero) in float32 equals gguf-py's dequantization: the C++ dequantization (the
    large-M path), the torch one (embedding rows) and a slice of rows; the file's own integers
    and factors, in the bits per weight the layout gives. A linear takes the same form, but the
    affine4 types' (4-bit, exact too)."""
    rows, cols = 24, 768
    t = random_blocks(qtype, rows, cols, seed=int(qtype))
    want = gguf_py(t)
    w = pack_embedding(t, own_kernels=True)
    group, bits = LAYOUT[qtype]
    assert isinstance(w, GroupQuantWeight) and w.bits == 8 and w.group == group
    assert 8 * sum(x.nbytes for x in (w.codes, w.scale, w.zero) if x is not None) / (rows * cols) == bits
    assert torch.equal(w.dequantize(), want)
    assert torch.equal(w.dequantize(5, 17), want[5:17])
    ids = torch.tensor([0, 23, 7, 7])
    assert torch.equal(w.rows(ids, torch.float32), want[ids])
    if qtype == Q.Q3_K:  # ±q: a negative scale's sign in the codes, so +4 (q = -4) where sc < 32
        assert w.int_codes().abs().max() == 4
    linear = pack_linear([t], torch.float32, own_kernels=True)
    if qtype.name in CODEBOOK_TYPES and codebook_weight.available():  # the file's own blocks
        assert isinstance(linear, CodebookWeight) and linear.blocks.nbytes == t.raw.nbytes
        assert torch.equal(linear.dequantize(), want)
    elif qtype in AFFINE4_TYPES:  # 4-bit codes affine in the 8-bit ones, float32 scale and zero
        assert linear.bits == 4 and linear.group == 32 and torch.equal(linear.dequantize(), want)
        assert 8 * sum(x.nbytes for x in (linear.codes, linear.scale, linear.zero)) / (rows * cols) <= 6
    else:
        assert torch.equal(linear.dequantize(), want) and torch.equal(linear.codes, w.codes)


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("qtype", NEW)
@pytest.mark.parametrize("m", [1, 3, 7, 200])  # 200: past large_m, dequantize + GEMM
def test_kernel_equals_x_times_the_file(qtype, m):
    """Float activations through ops.group_quant_matmul against x @ (gguf-py's weight).T in float64
    (the exact form; an embedding's, for Q6_K, which a tied LM head multiplies with)."""
    t = random_blocks(qtype, 80, 512, seed=m, magnitude=1e-3)
    w = pack_embedding(t, own_kernels=True)
    check_matmul(w, gguf_py(t).double(), m, seed=m)


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("qtype", NEW)
@pytest.mark.parametrize("m", [1, 2, 6, 20, 45])  # GEMV, GEMM, tiled GEMM
def test_int8_activations_take_the_exact_weight(qtype, m):
    """With int8 activations, the result is the exact weight times x rounded per 32 values to int8
    (dx = max|x| / 127), summed in float32; the weight's groups are 32, or 16 (Q6_K, Q3_K, Q2_K, IQ2_XS,
    IQ2_S, IQ1_M)."""
    k = 512
    t = random_blocks(qtype, 70, k, seed=m, magnitude=1e-3)
    w = pack_linear([t], torch.float32, own_kernels=True)
    w.set_int8_activations(True)
    group = LAYOUT[qtype][0] if qtype not in AFFINE4_TYPES else 32
    assert w.int8_activations and w.group == group
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    xg = x.view(m, -1, 32)
    amax = xg.abs().amax(dim=2, keepdim=True)
    xq = torch.round(xg * (127 / amax)).double()  # (M, K/32, 32), as the kernel rounds (float32, half to even)
    xr = (xq * (amax.double() / 127)).view(m, k)
    ref = xr @ gguf_py(t).double().t()
    # float32 sums of s * sum(c xq) dx + z * sum(xq) dx: relative to the magnitudes of the two terms
    c, s = w.int_codes().double(), w.scale_values().double()  # (N, K/G, G), (N, K/G)
    z = w.zero_values().double() if w.zero is not None else torch.zeros_like(s)
    xr = xr.view(m, -1, group)
    mag = torch.einsum("ngk,mgk,ng->mn", c.abs(), xr.abs(), s.abs()) + xr.sum(dim=2).abs() @ z.abs().t()
    assert ((w(x).double() - ref).abs() <= 2.0**-16 * mag + 1e-12).all()


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("qtype", NEW)
def test_tiles_hold_the_file_and_give_the_rows_numbers(qtype):
    """Stored in the 16-lane tiles (where the build has them): Q6_K in 6-bit tiles and Q3_K in 3-bit ones
    (their codes' signs moved to the scales), IQ4_NL and IQ4_XS as 4-bit indices into their levels, the
    codebook types of at most 16 signed grid values into those, Q2_K in 2-bit ones with its zeros, the
    others in 8-bit ones or kept by rows;
    gguf-py's weight still, and the tiled kernel's numbers those of the same weight by rows at every M."""
    from flashserve.kernels import ops

    t = random_blocks(qtype, 70, 512, seed=int(qtype), magnitude=1e-3)
    rows, tiled = (pack_linear([t], torch.float32, own_kernels=True) for _ in range(2))
    own_blocks = isinstance(tiled, CodebookWeight)  # the i-quants: the file's bytes (test_codebook_weight.py)
    if own_blocks:  # the exact 8-bit form by rows beside them
        rows = pack_embedding(t, own_kernels=True)
    for w in (rows, tiled):
        w.set_int8_activations(True)
    stored = tiled.to_wide_tiles()
    span_bytes = {Q.Q6_K: 384, Q.Q3_K: 192, Q.Q2_K: 128} | {  # 6, 3 and 2 bits a code, 4-bit indices
        q: 256 for q in (Q.IQ4_NL, Q.IQ4_XS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ1_M)} | (
        {Q.IQ2_XXS: 128, Q.IQ3_XXS: 192, Q.IQ2_XS: 128, Q.IQ2_S: 192, Q.IQ3_S: 192, Q.IQ1_S: 128, Q.IQ1_M: 128}
        if own_blocks else {})
    if qtype in span_bytes:
        assert stored == (ops.wide_tile_lanes() == 16)
        assert not stored or tiled.codes.shape[2] == span_bytes[qtype]
    assert torch.equal(tiled.dequantize(), gguf_py(t))
    for m in (1, 2, 20, 45):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)) * 3
        assert torch.equal(tiled(x), rows(x)), m


@pytest.mark.usefixtures("cpp_kernels")
def test_merged_parts_of_different_types():
    """q|k|v of different 8-bit types: one weight, one form holding them all exactly (the smallest
    group, tables and zeros repeated; factored where all are, else float32; absent zeros as zero)."""
    def parts(*qtypes):
        return [random_blocks(q, 32 * (i + 1), 512, seed=i) for i, q in enumerate(qtypes)]

    def want(ps):
        return torch.cat([gguf_py(p) for p in ps])

    def forms(ps):
        return [Int8Form(*exact_int8(p), GROUPS[p.qtype]) if p.qtype in (Q.Q5_K, Q.Q5_1, Q.Q2_K) else
                Int8Form(*exact_int8(p), None, GROUPS[p.qtype]) for p in ps]

    q3_q3_xs = parts(Q.Q3_K, Q.Q3_K, Q.IQ4_XS)  # factored tables throughout
    w = pack_linear(q3_q3_xs, torch.float32, own_kernels=True)
    assert isinstance(w, GroupQuantWeight) and w.group == 16 and w.scale.dtype == torch.uint8
    assert torch.equal(w.dequantize(), want(q3_q3_xs))
    q5k_q8_q51 = parts(Q.Q5_K, Q.Q8_0, Q.Q5_1, Q.IQ4_NL)  # zeros; factored and float tables
    w = pack_linear(q5k_q8_q51, torch.float32, own_kernels=True)
    assert isinstance(w, GroupQuantWeight) and w.group == 32 and w.zero is not None
    assert w.scale.dtype == torch.float32
    assert torch.equal(w.dequantize(), want(q5k_q8_q51))
    check_matmul(w, want(q5k_q8_q51).double(), 3)
    # Q6_K's exact form (an embedding's) beside others: groups of 16, tables repeated
    q3_q6 = parts(Q.Q3_K, Q.Q6_K)
    one = merged(forms(q3_q6))
    assert one.group == 16 and one.scale.dtype == torch.uint8
    w = GroupQuantWeight(one.codes, one.scale, one.zero, bits=8, group=16)
    assert torch.equal(w.dequantize(), want(q3_q6))
    # zeros of groups of 32 (Q5_K) and of 16 (Q2_K) beside a part without zeros, through the kernel
    q5k_q2k_q8 = parts(Q.Q5_K, Q.Q2_K, Q.Q8_0)
    w = pack_linear(q5k_q2k_q8, torch.float32, own_kernels=True)
    assert isinstance(w, GroupQuantWeight) and w.group == 16 and w.zero is not None
    assert torch.equal(w.dequantize(), want(q5k_q2k_q8))
    check_matmul(w, want(q5k_q2k_q8).double(), 3)


@pytest.mark.parametrize("qtype", [Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS, Q.Q2_K, Q.IQ2_XS, Q.TQ1_0])
def test_types_without_a_torch_kernel_stay_float_there(qtype):
    """Without this project's kernels these types stay dense, as before (torch has no exact form)."""
    assert pack_linear([random_blocks(qtype, 8, 256)], torch.float32, own_kernels=False) is None


@pytest.mark.usefixtures("cpp_kernels")
def test_a_real_q6k_tensor(qwen05_gguf):
    """Qwen2.5-Coder-0.5B's first Q6_K ffn_down (896 x 4864) in the exact form, and through the kernel."""
    from tests.model.test_quant_linear import real_tensors

    t = real_tensors(qwen05_gguf)[Q.Q6_K]
    w = pack_embedding(t, own_kernels=True)
    want = gguf_py(t)
    assert w.group == 16 and torch.equal(w.dequantize(), want)
    check_matmul(w, want.double(), 2)


K_AND_IQ4 = {"blk.0.attn_q": "Q3_K", "blk.0.attn_k": "Q3_K", "blk.0.attn_v": "Q5_K", "blk.0.attn_output": "IQ4_XS",
             "blk.0.ffn_gate": "Q5_K", "blk.0.ffn_up": "Q5_K", "blk.0.ffn_down": "IQ4_NL",
             "blk.1.attn_q": "IQ4_NL", "blk.1.attn_k": "IQ4_NL", "blk.1.attn_v": "Q5_1", "blk.1.attn_output": "Q5_1",
             "blk.1.ffn_gate": "IQ4_XS", "blk.1.ffn_up": "IQ4_XS", "blk.1.ffn_down": "Q3_K", "output": "Q5_K"}
LOW_BIT = {"blk.0.attn_q": "IQ2_XXS", "blk.0.attn_k": "IQ2_XXS", "blk.0.attn_v": "IQ3_S", "blk.0.attn_output": "IQ1_S",
           "blk.0.ffn_gate": "IQ3_XXS", "blk.0.ffn_up": "IQ3_XXS", "blk.0.ffn_down": "TQ1_0",
           "blk.1.attn_q": "Q2_K", "blk.1.attn_k": "Q2_K", "blk.1.attn_v": "IQ2_S", "blk.1.attn_output": "IQ2_XS",
           "blk.1.ffn_gate": "IQ1_M", "blk.1.ffn_up": "IQ1_M", "blk.1.ffn_down": "TQ2_0", "output": "Q2_K"}


# factors for weights of a few thousandths: the low-bit types' integers are smaller
@pytest.mark.parametrize("types, magnitude", [(K_AND_IQ4, 2e-3 / 64), (LOW_BIT, 2e-3 / 8)],
                         ids=["k-and-iq4", "2-and-3-bit"])
def test_tiny_model_of_these_types_matches_transformers(tmp_path, types, magnitude):
    """A 2-layer Qwen2 whose linears are random valid blocks of the types exact in linears: our
    logits, packed and with float activations, equal those of
    transformers loading the same file (it dequantizes with gguf-py) up to float32 summation order."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from flashserve.model.loader import load_model
    from tests.model.test_models_vs_hf import run_incremental
    from tests.model.tiny import VOCAB, write_gguf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    seeds = iter(range(1000))

    def encode(a: np.ndarray, qtype: Q) -> np.ndarray:  # random valid blocks of the tensor's shape
        return random_blocks(qtype, a.shape[0], a.shape[1], seed=next(seeds), magnitude=magnitude).raw

    path = write_gguf(tf.Qwen2ForCausalLM(cfg).eval(), tmp_path / "m.gguf", qtype="F32", qtype_of=types,
                      encode=encode)
    model, mcfg = load_model(str(path), torch.float32, quantization="weight-only")
    packed = [m for m in model.modules() if isinstance(m, GroupQuantWeight)]
    if types is K_AND_IQ4:  # q|k|v and gate|up merged; Q3_K's groups of 16 (layer 0's q|k|v, layer 1's down)
        assert len(packed) == 9 and {(m.bits, m.group) for m in packed} == {(8, 16), (8, 32)}
    else:  # the TQ downs 4-bit (affine4), Q2_K 8-bit in groups of 16; the i-quants in their own blocks
        # where the build has the tiles (layer 0's q|k, v, o, gate|up; layer 1's v, o, gate|up: q|k|v in two
        # segments), else 8-bit in groups of 32 (IQ2_XXS, IQ3_XXS) or of 16, or 4-bit (IQ3_S, IQ1_S)
        own_blocks = [m for m in model.modules() if isinstance(m, CodebookWeight)]
        assert len(own_blocks) == (7 if codebook_weight.available() else 0)
        assert len(packed) + len(own_blocks) == (11 if own_blocks else 10)
        forms = {(8, 16), (4, 32)} | ({(8, 32)} if not own_blocks else set())
        assert {(m.bits, m.group) for m in packed} == forms
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                              vocab_size=VOCAB).eval()  # the file has no vocabulary
    tokens = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    ours = run_incremental(model, mcfg, tokens, [8, 1, 1, 1, 1])
    assert ref.abs().max() > 0.1  # the weights carry the logits
    torch.testing.assert_close(ours, ref, atol=2e-5 * float(ref.abs().max()), rtol=0)
