"""dtype="auto": float32 where the weights run on the quantized kernels (whatever the CPU), else
bfloat16 exactly when this CPU has native bfloat16, as /proc/cpuinfo says."""
from __future__ import annotations

from flashserve.engine.arg_utils import resolve_dtype
from tests.host import cpu_flags
from tests.model.tiny import hf_tiny, write_gguf


def test_quantized_gguf_runs_float32_and_float_weights_follow_the_cpu(tmp_path):
    quantized = str(write_gguf(hf_tiny("llama"), tmp_path / "q.gguf", qtype="Q4_0"))
    dense = str(write_gguf(hf_tiny("llama"), tmp_path / "f.gguf", qtype="F32"))
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    float_choice = "bfloat16" if native else "float32"
    assert resolve_dtype("auto", quantized, "auto").dtype == "float32"
    assert resolve_dtype("auto", quantized, "weight-only").dtype == "float32"
    assert resolve_dtype("auto", quantized, "none").dtype == float_choice  # dequantized: float weights
    assert resolve_dtype("auto", dense, "auto").dtype == float_choice
    assert resolve_dtype("bf16", quantized, "auto").dtype == "bfloat16"
    assert resolve_dtype("float32", dense, "none").dtype == "float32"
