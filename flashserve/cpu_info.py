"""What this CPU offers, read once from /proc/cpuinfo: the facts behind every run-time choice of a
compute dtype or kernel level, and what `flashserve env` prints."""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

# Instruction-set features the engine's choices look at, in the order `flashserve env` lists them.
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
            "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CPUInfo:
    model_name: str  # with the family and model numbers: "AMD EPYC" alone names several generations
    flags: frozenset[str]

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(f for f in FEATURES if f in self.flags)

    @property
    def native_bf16(self) -> bool:
        """bfloat16 dot products in hardware (AVX512-BF16 or AMX), not emulated through float32."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags


@functools.cache
def cpu_info() -> CPUInfo:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first processor's block is enough: the cores are alike
                key, _, value = line.partition(":")
                if not key.strip():
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return CPUInfo(name, frozenset(fields.get("flags", "").split()))
