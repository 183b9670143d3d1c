"""A file of the 1- to 4-bit types written by llama.cpp's own llama-quantize (an optional peer,
built for the host by `make llama-quantize`) from SmolLM2, with an importance matrix flashserve wrote
in llama.cpp's GGUF form: llama.cpp reads that matrix (IQ2_XXS, IQ2_XS and IQ1_* are written only with
one), every tensor of these types, real blocks, runs in flashserve's exact form, bit for bit gguf-py's
dequantization, also as the 16-lane tiles hold it (Q3_K at 3 bits, the i-quants IQ1_* to IQ3_* in their
own bytes, IQ4_* as 4-bit indices), and the
whole model on those forms computes what the file's dequantized weights do. SmolLM2's rows of 576 are
not a multiple of 256, so only ffn_down (rows of 1536) can take these types: two layers' ffn_down
each, the rest Q4_0."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from flashserve.model.loader.gguf_file import open_gguf
from flashserve.quantization.gguf_blocks import GGUFTensor
from flashserve.quantization.codebook_weight import CodebookWeight
from flashserve.quantization.gguf_method import pack_embedding, pack_linear

ROOT = Path(__file__).resolve().parents[2]
CALIB = "/usr/share/common-licenses/GPL-3"
SPAN_BYTES = {"Q3_K": 192, "Q2_K": 128} | {  # a tiled span's bytes, where not 8-bit
    t: 256 for t in ("IQ4_XS", "IQ4_NL", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ1_M")}
# a span's bytes of 16 rows: the file's that come per span (indices, signs; the rest per block), with the grids
# looked up when stored (IQ2_S, IQ1_*) their entries' grid words for the indices' low bytes
OWN_SPAN_BYTES = {"IQ2_XXS": 128, "IQ3_XXS": 192, "IQ2_XS": 128, "IQ2_S": 192, "IQ3_S": 192, "IQ1_S": 128, "IQ1_M": 128}
TYPES = ["Q3_K", "IQ4_XS", "IQ4_NL", "Q2_K", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M",
         "TQ1_0", "TQ2_0"]


@pytest.fixture(scope="module")
def llama_written(smollm2_gguf, tmp_path_factory) -> Path:
    from flashserve.quantization.imatrix import compute_imatrix, save_imatrix

    built = sorted(ROOT.glob(".peers/llama-quantize-*/bin/llama-quantize"))
    if not built:
        pytest.skip("llama.cpp's llama-quantize is not built here (`make llama-quantize`)")
    work = tmp_path_factory.mktemp("llama-written")
    imatrix = work / "smollm2.imatrix.gguf"
    found, tokens, seq_len = compute_imatrix(smollm2_gguf, CALIB, seq_len=96, max_seqs=2)
    save_imatrix(str(imatrix), found, tokens, CALIB, chunk_size=seq_len)
    layers = [x for i, t in enumerate(TYPES)
              for x in ("--tensor-type", f"blk\\.({2 * i}|{2 * i + 1})\\.ffn_down={t.lower()}")]
    out = work / "mixed.gguf"
    proc = subprocess.run([str(built[-1]), "--allow-requantize", "--imatrix", str(imatrix), *layers, smollm2_gguf,
                           str(out), "Q4_0", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "have importance matrix data with 211 entries" in proc.stdout + proc.stderr  # 30 x 7 linears + head
    return out


@pytest.mark.slow  # llama-quantize of SmolLM2, ~14 s for the module
@pytest.mark.parametrize("qtype", TYPES)
def test_each_tensor_of_the_type_is_exact(qtype, llama_written, cpp_kernels):
    tensors = [GGUFTensor(t.data, t.tensor_type, (int(t.shape[1]), int(t.shape[0])))
               for t in open_gguf(str(llama_written)).tensors if t.tensor_type == Q[qtype]]
    assert len(tensors) == 2
    for t in tensors:
        want = torch.from_numpy(np.asarray(quants.dequantize(t.raw, t.qtype), np.float32).reshape(t.shape))
        w, tiled = (pack_linear([t], torch.float32, own_kernels=True) for _ in range(2))
        own_blocks = isinstance(tiled, CodebookWeight)  # the i-quants, where the build has the tiles
        if own_blocks:  # beside the exact 8-bit form by rows
            w = pack_embedding(t, own_kernels=True)
        assert torch.equal(w.dequantize(), want)
        w.set_int8_activations(True)
        tiled.set_int8_activations(True)
        if tiled.to_wide_tiles() and qtype in (OWN_SPAN_BYTES if own_blocks else SPAN_BYTES):  # where the build has the tiles
            assert tiled.codes.shape[2] == (OWN_SPAN_BYTES if own_blocks else SPAN_BYTES)[qtype]
        assert torch.equal(tiled.dequantize(), want)
        x = torch.randn(3, t.shape[1], generator=torch.Generator().manual_seed(0))
        assert torch.equal(tiled(x), w(x))


@pytest.mark.slow
def test_the_model_on_these_forms_computes_its_dequantized_weights(llama_written, cpp_kernels):
    """Prompt logits on the packed forms (float activations) against the same file dequantized (the
    float path), equal up to float32 summation order over 30 layers (the shipped file's two paths
    differ by 1.7e-4 of the largest logit, this file's by 2.3e-4, measured; a misread tensor moves
    logits by whole units)."""
    from flashserve.model.loader import load_model
    from flashserve.quantization.calibrate import engine_prefill, own_kv_cache

    prompt = list(range(1000, 1040))
    logits = []
    for quantization in ("weight-only", "none"):
        model, cfg = load_model(str(llama_written), torch.float32, quantization=quantization)
        with own_kv_cache(model, cfg, len(prompt)):
            logits.append(model.compute_logits(engine_prefill(model, prompt)))
    packed, dense = logits
    assert dense.abs().max() > 1
    torch.testing.assert_close(packed, dense, atol=1e-3 * float(dense.abs().max()), rtol=0)
    assert torch.equal(packed.argmax(1), dense.argmax(1))
