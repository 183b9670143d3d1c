"""Q4_K, Q5_K and Q6_K dequantized in torch (quantization/gguf_blocks.py) against gguf-py's numpy reference,
bit for bit: random blocks with every bit pattern of codes and scales, and a real Q6_K tensor."""
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
