"""Q4_K, Q5_K and Q6_K dequantized in torch (quantization/gguf_blocks.py) against gguf-py's numpy reference,
bit for bit: random blocks with every bit pattern of codes and scales, and a real Q6_K tensor; Q6_K
requantized to 8-bit groups in C++ against the same requantization in torch; and Q4_K factored in C++
against numpy's factoring and gguf-py's weights."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGML_QUANT_SIZES, quants

from flashserve.quantization.gguf_blocks import GGUFTensor

# Byte offsets of each type's float16 factors within a block (random bytes there could be NaN or inf).
HALF_FIELDS = {GGMLQuantizationType.Q4_K: (0, 2), GGMLQuantizationType.Q5_K: (0, 2), GGMLQuantizationType.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", list(HALF_FIELDS))
def test_torch_dequantization_equals_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, blocks = 24, 3
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:  # finite factors of either sign over a wide range
        halves = (rng.standard_normal((rows, blocks)) * 10.0 ** rng.integers(-4, 2, (rows, blocks))).astype(np.float16)
        raw[..., offset : offset + 2] = halves.view(np.uint8).reshape(rows, blocks, 2)
    raw = raw.reshape(rows, blocks * size)
    got = GGUFTensor(raw, qtype, (rows, blocks * 256)).dequantize()
    want = np.asarray(quants.dequantize(raw, qtype), dtype=np.float32).reshape(rows, blocks * 256)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_a_real_q6k_tensor(gemma3_gguf):
    import gguf

    reader = gguf.GGUFReader(gemma3_gguf)
    t = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q6_K)
    raw = np.asarray(t.data)
    shape = (int(t.shape[1]), int(t.shape[0]))
    got = GGUFTensor(raw, t.tensor_type, shape).dequantize()
    np.testing.assert_array_equal(got, np.asarray(quants.dequantize(raw, t.tensor_type), np.float32).reshape(shape))


def _random_q6k(rng, rows: int, blocks: int) -> np.ndarray:
    raw = rng.integers(0, 256, (rows, blocks, 210), dtype=np.uint8)
    halves = (rng.standard_normal((rows, blocks)) * 10.0 ** rng.integers(-4, 2, (rows, blocks))).astype(np.float16)
    raw[..., 208:210] = halves.view(np.uint8).reshape(rows, blocks, 2)
    raw[0, 0, 192:194] = 0  # sub-blocks 0 and 1 scaled by zero: an all-zero group of 32 (its scale is 1)
    return raw.reshape(rows, blocks * 210)


@pytest.mark.usefixtures("cpp_kernels")
def test_q6k_requantized_in_one_cpp_pass_equals_the_torch_passes(gemma3_gguf):
    """The loader's C++ Q6_K -> 8-bit groups of 32 (kernels/csrc/gguf_repack.cpp) against gguf-py's
    dequantization requantized by torch (torch_int_weights.quantize_groups), bit for bit: random blocks
    over every bit pattern (rows enough for several threads' shares) and a real tensor."""
    import gguf
    import torch

    from flashserve.kernels import ops
    from flashserve.quantization.torch_int_weights import quantize_groups

    reader = gguf.GGUFReader(gemma3_gguf)
    real = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q6_K)
    cases = [(_random_q6k(np.random.default_rng(7), 70, 3), 70, 3 * 256),
             (np.asarray(real.data), int(real.shape[1]), int(real.shape[0]))]
    for raw, rows, cols in cases:
        codes, scale = ops.native().q6k_requantize_int8(GGUFTensor(raw, GGMLQuantizationType.Q6_K, (rows, cols)).block_bytes())
        want = torch.from_numpy(np.asarray(quants.dequantize(raw, GGMLQuantizationType.Q6_K), np.float32)).reshape(rows, cols)
        want_codes, want_scale = quantize_groups(want)
        assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
        if rows == 70:
            assert scale[0, 0] == 1.0 and not codes[0, :32].any()  # the all-zero group


@pytest.mark.usefixtures("cpp_kernels")
def test_q4k_factored_in_one_cpp_pass_equals_numpy_and_gguf_py(gemma3_gguf):
    """The loader's C++ Q4_K -> codes, 6-bit scales and mins, d and -dmin (kernels/csrc/gguf_repack.cpp)
    against numpy's gguf_blocks.q4k_factored byte for byte, and the weights they factor against
    gguf-py's dequantization: random blocks over every bit pattern (rows enough for several threads'
    shares) and a real tensor."""
    import gguf
    import torch

    from flashserve.kernels import ops
    from flashserve.quantization.gguf_blocks import q4k_factored

    rng = np.random.default_rng(4)
    rows, blocks = 70, 3
    raw = rng.integers(0, 256, (rows, blocks, 144), dtype=np.uint8)
    for offset in HALF_FIELDS[GGMLQuantizationType.Q4_K]:
        halves = (rng.standard_normal((rows, blocks)) * 10.0 ** rng.integers(-4, 2, (rows, blocks))).astype(np.float16)
        raw[..., offset : offset + 2] = halves.view(np.uint8).reshape(rows, blocks, 2)
    real = next(t for t in gguf.GGUFReader(gemma3_gguf).tensors if t.tensor_type == GGMLQuantizationType.Q4_K)
    cases = [(raw.reshape(rows, blocks * 144), rows, blocks * 256),
             (np.asarray(real.data), int(real.shape[1]), int(real.shape[0]))]
    for data, n, k in cases:
        t = GGUFTensor(data, GGMLQuantizationType.Q4_K, (n, k))
        got = ops.native().q4k_factored_parts([t.block_bytes()])
        codes, (sc, d), (mn, neg_dmin) = q4k_factored(t)
        for ours, theirs in zip(got, (codes, sc, d, mn, neg_dmin)):
            theirs = torch.from_numpy(np.ascontiguousarray(theirs))
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))  # float16 bit patterns too
        s, dd, m, nd = (a.double() for a in got[1:])
        b = got[0].long().view(n, k // 32, 16)  # byte j of a group: code j low, code j + 16 high
        q = torch.cat([b & 0x0F, b >> 4], dim=-1).double()
        w = q * (dd.repeat_interleave(8, 1) * s)[..., None] + (nd.repeat_interleave(8, 1) * m)[..., None]
        want = np.asarray(quants.dequantize(data, GGMLQuantizationType.Q4_K), np.float64).reshape(n, k)
        np.testing.assert_allclose(w.reshape(n, k).numpy(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.usefixtures("cpp_kernels")
def test_q4k_parts_stacked_in_one_call_equal_each_alone():
    """Parts given together (q|k|v, gate|up) come out as their rows stacked in order."""
    import torch

    from flashserve.kernels import ops

    rng = np.random.default_rng(5)
    parts = [rng.integers(0, 256, (rows, 2 * 144), dtype=np.uint8) for rows in (33, 7, 70)]
    blocks = [torch.from_numpy(p) for p in parts]
    together = ops.native().q4k_factored_parts(blocks)
    alone = [ops.native().q4k_factored_parts([b]) for b in blocks]
    for i, stacked in enumerate(together):
        assert torch.equal(stacked.view(torch.uint8), torch.cat([a[i] for a in alone]).view(torch.uint8))
    with pytest.raises(RuntimeError, match="one K for all"):
        ops.native().q4k_factored_parts([blocks[0], torch.from_numpy(rng.integers(0, 256, (3, 144), dtype=np.uint8))])
