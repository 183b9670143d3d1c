"""The C++ fused element-wise ops against the torch implementations they replace (two paths)."""
from __future__ import annotations

import pytest
import torch

from flashserve.kernels import reference
from flashserve.model.layers import activation
from flashserve.model.layers.norm import RMSNorm
from flashserve.model.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.usefixtures("cpp_kernels")
# float32: summation order only; bfloat16: at most one rounding step apart.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7, 64])
def test_rms_norm_and_residual_add(dtype, T):
    g = torch.Generator().manual_seed(T)
    norm = RMSNorm(96, 1e-6)
    norm.weight.copy_(torch.randn(96, generator=g))
    x = (torch.randn(T, 96, generator=g) * 3).to(dtype)
    residual = torch.randn(T, 96, generator=g).to(dtype)
    torch.testing.assert_close(norm(x), reference.rms_norm(x, norm.weight, norm.eps), **TOL[dtype])
    want_sum = x + residual
    got, got_sum = norm.forward_residual(x, residual.clone())
    torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=0)  # the sum is rounded exactly as torch rounds it
    torch.testing.assert_close(got, reference.rms_norm(want_sum, norm.weight, norm.eps), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_norm_and_rotary_on_strided_views(dtype):
    """q and k as column slices of one fused projection output (not contiguous)."""
    g = torch.Generator().manual_seed(0)
    T, hq, hk, d = 5, 6, 2, 32
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=1)
    q, k = q.view(T, hq, d), k.view(T, hk, d)
    norm = RMSNorm(d, 1e-6)
    norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
    torch.testing.assert_close(norm(q), reference.rms_norm(q, norm.weight, norm.eps), **TOL[dtype])
    rope = RotaryEmbedding(d, 4096, 10000.0)
    positions = torch.tensor([0, 3, 17, 1000, 4095])
    want_q, want_k = reference.rotary(positions, q.clone(), k.clone(), rope.cos, rope.sin)
    got_q, got_k = rope(positions, q, k)
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])


@pytest.mark.parametrize("position", [64, 1 << 20, -1])
def test_rotary_refuses_a_position_past_its_tables(position):
    """The engine sizes the tables to its context (load_model's max_positions): a position outside
    them is an error in the C++ kernel, never a read past the end (the torch twin's indexing raises
    on its own past the end)."""
    rope = RotaryEmbedding(16, 64, 10000.0)
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    with pytest.raises(RuntimeError, match=f"position {position} is outside the tables' 64 positions"):
        rope(torch.tensor([3, position]), q, k)


def test_load_model_sizes_rotary_tables_to_max_positions(tmp_path):
    """Tables of max_positions rows, each row the full table's (Gemma 3: both of its bases); the
    config returned still names the model's own context."""
    from flashserve.model.loader import load_model
    from tests.model.tiny import hf_tiny, write_gguf

    path = str(write_gguf(hf_tiny("gemma3"), tmp_path / "gemma3.gguf"))
    full, cfg = load_model(path)
    short, short_cfg = load_model(path, max_positions=40)
    tables = lambda m: [t for t in m.modules() if isinstance(t, RotaryEmbedding)]  # noqa: E731
    assert len(tables(short)) == len(tables(full)) >= 2
    for got, want in zip(tables(short), tables(full)):
        assert got.cos.shape[0] == 40 < want.cos.shape[0] == cfg.max_position_embeddings
        assert torch.equal(got.cos, want.cos[:40]) and torch.equal(got.sin, want.sin[:40])
    assert short_cfg == cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh"])
def test_act_and_mul(dtype, name):
    g = torch.Generator().manual_seed(1)
    # 83 columns: ten vector lanes of 8 and a scalar tail; the first row spans exp's clamps
    gate_up = (torch.randn(9, 2 * 83, generator=g) * 4)
    gate_up[0, :83] = torch.linspace(-120, 120, 83)
    gate_up = gate_up.to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    act = torch.nn.functional.silu if name == "silu" else lambda t: torch.nn.functional.gelu(t, approximate="tanh")
    torch.testing.assert_close(activation.get_act_and_mul(name)(gate_up), act(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("shape", [(1, 49152), (32, 1000), (3, 7)])
def test_argmax_rows_picks_torchs_index(shape):
    """The first maximum of each row, ties and NaN included (torch's CPU argmax treats NaN as the
    largest value), against torch.argmax."""
    from flashserve.kernels import ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    m, v = shape
    x[0, v // 3] = x[0, v - 1] = x[0].max() + 1  # a tie: the earlier index wins
    if m > 1:
        x[1, v // 2] = float("nan")  # a NaN beats every number
        x[1, v - 1] = float("nan")
    if m > 2:
        x[2] = float("-inf")  # nothing but -inf: index 0
    got = ops.argmax_rows(x)
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[0].item() == v // 3
