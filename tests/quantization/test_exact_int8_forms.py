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

from flashserve.quantization.gguf_blocks import GGUFTensor
from flashserve.quantization.gguf_int8_forms import GROUPS, Int8Form, exact_int8, merged
from flashserve.quantization.gguf_method import REQUANTIZED_IN_LINEARS, pack_embedding, pack_linear
from flashserve.quantization.group_quant_weight import GroupQuantWeight
from flashserve.quantization.packed import RowSegments
from tests.model.test_quant_linear import check_matmul

# Byte offsets of each block's float16 factors (ggml-common.h: block_q5_1, block_q5_K, block_q6_K,
# block_q3_K, block_iq4_nl, block_iq4_xs, block_q8_0), the rest of a block being any bytes.
HALF_FIELDS = {Q.Q5_1: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q3_K: (108,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
               Q.Q8_0: (0,)}
NEW = [Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS]
# group, and bits per weight: 8-bit codes, the scale table (and zero table) per group
LAYOUT = {Q.Q5_1: (32, 9.0), Q.Q5_K: (32, 8.625), Q.Q6_K: (16, 8.625), Q.Q3_K: (32, 8.3125),
          Q.IQ4_NL: (32, 8.5), Q.IQ4_XS: (32, 8.3125)}


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0, magnitude: float | None = None) -> GGUFTensor:
    """Random bytes with finite float16 factors: of either sign over a wide range, or of about
    `magnitude` (model-sized weights)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rows * cols // block
    raw = rng.integers(0, 256, (blocks, size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        if magnitude is None:
            halves = rng.standard_normal(blocks) * 10.0 ** rng.integers(-4, 2, blocks)
        else:
            halves = rng.uniform(0.5, 1.5, blocks) * magnitude
        raw[:, offset : offset + 2] = halves.astype(np.float16).view(np.uint8).reshape(blocks, 2)
    return GGUFTensor(raw.reshape(rows, -1), qtype, (rows, cols))


def gguf_py(t: GGUFTensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(quants.dequantize(t.raw, t.qtype), np.float32).reshape(t.shape))


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("qtype", NEW)
def test_packed_weight_is_the_file_bit_for_bit(qtype):
    """codes * scale (+ zero) in float32 equals gguf-py's dequantization: the C++ dequantization (the
    large-M path), the torch one (embedding rows) and a slice of rows; the file's own integers
    and factors, in the bits per weight the layout gives. A linear takes the same form, but Q6_K's
    (requantized per group of 32, for int8 activations)."""
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
    if qtype == Q.Q3_K:  # (sc - 32) q = 128 (sc = 0, q = -4) is held negated: the code -128
        assert int(w.int_codes().min()) == -128
    linear = pack_linear([t], torch.float32, own_kernels=True)
    if qtype in REQUANTIZED_IN_LINEARS:
        assert linear.group == 32
        err = (linear.dequantize() - want).view(rows, -1, 32).abs().amax(dim=2)
        assert (err <= want.view(rows, -1, 32).abs().amax(dim=2) / 254 * (1 + 1e-5)).all()
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
@pytest.mark.parametrize("qtype", [q for q in NEW if LAYOUT[q][0] == 32])
@pytest.mark.parametrize("m", [1, 6, 20, 45])  # GEMV, GEMM, tiled GEMM
def test_int8_activations_take_the_exact_weight(qtype, m):
    """With int8 activations (groups of 32), the result is the exact weight times x rounded per group
    of 32 to int8 (dx = max|x| / 127), summed in float32."""
    k = 512
    t = random_blocks(qtype, 70, k, seed=m, magnitude=1e-3)
    w = pack_linear([t], torch.float32, own_kernels=True)
    w.set_int8_activations(True)
    assert w.int8_activations
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    xg = x.view(m, -1, 32)
    amax = xg.abs().amax(dim=2, keepdim=True)
    xq = torch.round(xg * (127 / amax)).double()  # (M, K/32, 32), as the kernel rounds (float32, half to even)
    xr = (xq * (amax.double() / 127)).view(m, k)
    ref = xr @ gguf_py(t).double().t()
    # float32 sums of s * sum(c xq) dx + z * sum(xq) dx: relative to the magnitudes of the two terms
    c, s = w.int_codes().double(), w.scale_values().double()  # (N, K/32, 32), (N, K/32)
    z = w.zero_values().double() if w.zero is not None else torch.zeros_like(s)
    xr = xr.view(m, -1, 32)
    mag = torch.einsum("ngk,mgk,ng->mn", c.abs(), xr.abs(), s.abs()) + xr.sum(dim=2).abs() @ z.abs().t()
    assert ((w(x).double() - ref).abs() <= 2.0**-16 * mag + 1e-12).all()


@pytest.mark.usefixtures("cpp_kernels")
def test_merged_parts_of_different_types():
    """q|k|v of different 8-bit types: one weight where one form holds them all exactly (the smallest
    group, tables repeated; factored where all are, else float32; absent zeros as zero), else one
    weight per run of a type (zeros with groups of 16 are not a kernel form)."""
    def parts(*qtypes):
        return [random_blocks(q, 32 * (i + 1), 512, seed=i) for i, q in enumerate(qtypes)]

    def want(ps):
        return torch.cat([gguf_py(p) for p in ps])

    def forms(ps):
        return [Int8Form(*exact_int8(p), GROUPS[p.qtype]) if p.qtype in (Q.Q5_K, Q.Q5_1) else
                Int8Form(*exact_int8(p), None, GROUPS[p.qtype]) for p in ps]

    q3_q3_xs = parts(Q.Q3_K, Q.Q3_K, Q.IQ4_XS)  # factored tables throughout
    w = pack_linear(q3_q3_xs, torch.float32, own_kernels=True)
    assert isinstance(w, GroupQuantWeight) and w.group == 32 and w.scale.dtype == torch.uint8
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
    assert merged(forms(parts(Q.Q5_K, Q.Q6_K))) is None  # zeros need groups of 32


@pytest.mark.parametrize("qtype", [Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS])
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


def test_tiny_model_of_these_types_matches_transformers(tmp_path):
    """A 2-layer Qwen2 whose linears are random valid blocks of every type exact in linears: our
    logits, packed and with float activations, equal those of transformers loading the same file (it
    dequantizes with gguf-py) up to float32 summation order."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from flashserve.model.loader import load_model
    from tests.model.test_models_vs_hf import run_incremental
    from tests.model.tiny import VOCAB, write_gguf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    types = {"blk.0.attn_q": "Q3_K", "blk.0.attn_k": "Q3_K", "blk.0.attn_v": "Q5_K", "blk.0.attn_output": "IQ4_XS",
             "blk.0.ffn_gate": "Q5_K", "blk.0.ffn_up": "Q5_K", "blk.0.ffn_down": "IQ4_NL",
             "blk.1.attn_q": "IQ4_NL", "blk.1.attn_k": "IQ4_NL", "blk.1.attn_v": "Q5_1", "blk.1.attn_output": "Q5_1",
             "blk.1.ffn_gate": "IQ4_XS", "blk.1.ffn_up": "IQ4_XS", "blk.1.ffn_down": "Q3_K", "output": "Q5_K"}
    seeds = iter(range(1000))

    def encode(a: np.ndarray, qtype: Q) -> np.ndarray:  # random valid blocks of the tensor's shape
        return random_blocks(qtype, a.shape[0], a.shape[1], seed=next(seeds), magnitude=2e-3 / 64).raw

    path = write_gguf(tf.Qwen2ForCausalLM(cfg).eval(), tmp_path / "m.gguf", qtype="F32", qtype_of=types,
                      encode=encode)
    model, mcfg = load_model(str(path), torch.float32, quantization="weight-only")
    packed = [m for m in model.modules() if isinstance(m, GroupQuantWeight)]
    assert len(packed) == 9 and all(m.group == 32 for m in packed)  # q|k|v and gate|up merged
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                              vocab_size=VOCAB).eval()  # the file has no vocabulary
    tokens = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    ours = run_incremental(model, mcfg, tokens, [8, 1, 1, 1, 1])
    assert ref.abs().max() > 0.1  # the weights carry the logits
    torch.testing.assert_close(ours, ref, atol=2e-5 * float(ref.abs().max()), rtol=0)
