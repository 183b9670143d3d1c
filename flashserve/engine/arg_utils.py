"""EngineArgs: the user's knobs (LLM(...), CLI flags) turned into a validated EngineConfig."""
from __future__ import annotations

from dataclasses import dataclass

from flashserve.config import CacheConfig, EngineConfig, SchedulerConfig

DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_KV_CACHE_CAP = 2 << 30  # bytes; never reserve more than this unless asked


@dataclass
class EngineArgs:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16"
    quantization: str = "auto"  # QUANTIZATION_CHOICES: "auto" | "weight-only" | "none"
    max_model_len: int | None = None  # default: min(model context, 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; default: enough for max_num_seqs full contexts, capped
    kv_cache_fraction: float = 0.25  # cap of the default budget, as a fraction of available RAM
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    scheduling: str = "continuous"
    policy: str = "fcfs"
    seed: int = 0
    num_threads: int | None = None

    def create_engine_config(self) -> EngineConfig:
        from flashserve.model.catalogue import resolve
        from flashserve.model.loader import load_model_config

        path = resolve(self.model)
        model_config = load_model_config(str(path))
        max_len = self.max_model_len or min(model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if max_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's context length {model_config.max_position_embeddings}"
            )
        config = EngineConfig(
            model=self.model,
            model_path=str(path),
            model_config=model_config,
            dtype=resolve_dtype(self.dtype),
            quantization=self.quantization,
            seed=self.seed,
            num_threads=self.num_threads,
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory=self.kv_cache_memory,
                kv_cache_fraction=self.kv_cache_fraction,
                kv_cache_dtype=self.kv_cache_dtype,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max(self.max_num_batched_tokens, 1),
                max_num_seqs=self.max_num_seqs,
                max_model_len=max_len,
                scheduling=self.scheduling,
                policy=self.policy,
            ),
        )
        config.validate()
        return config


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """'auto' picks bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX), else float32.
    Norm statistics, softmax and sampling stay in float32 either way."""
    if dtype == "auto":
        return "bfloat16" if device != "cpu" or cpu_has_native_bf16() else "float32"
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}
    return aliases.get(dtype, dtype)


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
