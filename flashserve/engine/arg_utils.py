"""EngineArgs: the user's knobs (LLM(...), CLI flags) turned into a validated EngineConfig."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flashserve.config import (ACTIVATION_METHODS, HEAD_METHODS, ActivationQuantConfig, CacheConfig, EngineConfig,
                               HotNeuronConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig)
from flashserve.errors import ModelNotFoundError

DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_KV_CACHE_CAP = 2 << 30  # bytes; never reserve more than this unless asked
# "acceptance": "rejection" (lossless) | "typical" (Medusa's, not lossless; posterior_threshold, posterior_alpha)
SPECULATIVE_CONFIG_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                           "adaptive", "draft_cost", "disable_by_batch_size",
                           "acceptance", "posterior_threshold", "posterior_alpha")


@dataclass
class EngineArgs:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16"
    quantization: str = "auto"  # QUANTIZATION_CHOICES: "auto" | "weight-only" | "none" | "smoothquant" | "llm.int8"
    smoothquant_alpha: float = 0.5  # ActivationQuantConfig's options
    calibration_text: str | None = None
    smoothquant_down_proj: bool = False
    llm_int8_threshold: float = 6.0
    max_model_len: int | None = None  # default: min(model context, 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; default: enough for max_num_seqs full contexts, capped
    kv_cache_fraction: float = 0.25  # cap of the default budget, as a fraction of available RAM
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    swap_space: int = 0  # bytes of host memory for preempted requests' KV blocks (0: none, always recompute)
    preemption_mode: str = "auto"  # "auto" | "recompute" | "swap"
    scheduling: str = "continuous"
    policy: str = "fcfs"
    seed: int = 0
    num_threads: int | None = None
    speculative_method: str | None = None  # None (off) | "ngram" (prompt lookup) | "draft_model" | "medusa" | "eagle"
    speculative_model: str | None = None  # the draft of "draft_model" (path or catalogue name), heads file of the others
    num_speculative_tokens: int = 4  # k: drafts verified per request and step
    prompt_lookup_min: int = 1  # n-gram sizes tried, largest first
    prompt_lookup_max: int = 4
    # vLLM's spelling of the same knobs, instead of the flat ones above: {"method": ..., "model": ...,
    # "num_speculative_tokens": k, "prompt_lookup_min": n, "prompt_lookup_max": n}, and the keys only this
    # spelling has: "adaptive" (default True), "draft_cost", "disable_by_batch_size" (SpeculativeConfig)
    speculative_config: dict | None = None
    tensor_parallel_size: int = 1  # ranks one model is split over (Megatron-style), each a worker process
    distributed_executor_backend: str | None = None  # None: "uni" for one rank, else "mp"
    worker_timeout_s: float = 300.0  # a worker silent this long during start-up or a step counts as hung
    pipeline_parallel_size: int = 1  # stages of layers, a worker process each
    pipeline_micro_batches: int | None = None  # steps in flight under pipeline parallelism; None: one per stage
    max_weight_memory: int | None = None  # bytes of weights resident at once; the other layers stream
    hot_neuron_profile: str | None = None  # HotNeuronConfig's options: `flashserve profile-neurons` output
    hot_neuron_fraction: float = 0.2
    neuron_predictor: bool = False
    neuron_predictor_max_disagreement: float = 0.0
    huge_pages: bool = True  # EngineConfig.huge_pages
    weight_cache: bool = True  # EngineConfig.weight_cache

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
            dtype=resolve_dtype(self.dtype, str(path), self.quantization).dtype,
            quantization=self.quantization,
            activation_quant=ActivationQuantConfig(self.smoothquant_alpha, self.calibration_text,
                                                   self.smoothquant_down_proj, self.llm_int8_threshold),
            seed=self.seed,
            num_threads=self.num_threads,
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory=self.kv_cache_memory,
                kv_cache_fraction=self.kv_cache_fraction,
                kv_cache_dtype=self.kv_cache_dtype,
                enable_prefix_caching=self.enable_prefix_caching,
                swap_space=self.swap_space,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max(self.max_num_batched_tokens, 1),
                max_num_seqs=self.max_num_seqs,
                max_model_len=max_len,
                scheduling=self.scheduling,
                policy=self.policy,
                preemption_mode=self.preemption_mode,
            ),
            speculative=self.create_speculative_config(),
            parallel=ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend,
                                    self.worker_timeout_s, self.pipeline_parallel_size,
                                    self.pipeline_micro_batches),
            max_weight_memory=self.max_weight_memory,
            hot_neurons=HotNeuronConfig(self.hot_neuron_profile, self.hot_neuron_fraction, self.neuron_predictor,
                                        self.neuron_predictor_max_disagreement),
            huge_pages=self.huge_pages and self.max_weight_memory is None,
            weight_cache=self.weight_cache,
        )
        config.validate()
        return config

    def create_speculative_config(self) -> SpeculativeConfig:
        """The one place both spellings become a SpeculativeConfig: vLLM's speculative_config dict
        (LLM(speculative_config={...}), --speculative-config '{json}') or the flat fields. As in
        vLLM, a dict naming a model but no method means "draft_model"."""
        if self.speculative_config is None:
            knobs = dict(method=self.speculative_method, model=self.speculative_model,
                         num_speculative_tokens=self.num_speculative_tokens,
                         prompt_lookup_min=self.prompt_lookup_min, prompt_lookup_max=self.prompt_lookup_max)
        else:
            if self.speculative_method is not None or self.speculative_model is not None:
                raise ValueError("give speculative_config or speculative_method/speculative_model, not both")
            knobs = dict(self.speculative_config)
            unknown = sorted(set(knobs) - set(SPECULATIVE_CONFIG_KEYS))
            if unknown:
                raise ValueError(f"unknown speculative_config keys {unknown}; "
                                 f"known: {', '.join(SPECULATIVE_CONFIG_KEYS)}")
            if knobs.get("method") is None and knobs.get("model") is not None:
                knobs["method"] = "draft_model"
        if knobs.get("method") in HEAD_METHODS and knobs.get("model") is not None:
            from flashserve.spec_decode.heads import read_heads_config

            return SpeculativeConfig(**knobs, draft_model_path=str(knobs["model"]),
                                     heads_config=read_heads_config(knobs["model"]))
        if knobs.get("method") != "draft_model" or knobs.get("model") is None:
            return SpeculativeConfig(**knobs)  # validate() names what is wrong, if anything
        from flashserve.model.catalogue import resolve
        from flashserve.model.loader import load_model_config

        try:
            path = resolve(knobs["model"])
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"draft model: {exc}") from None
        return SpeculativeConfig(**knobs, draft_model_path=str(path), draft_model_config=load_model_config(str(path)))


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "float32" | "bfloat16"
    reason: str  # one line for logs and `flashserve env`


def resolve_dtype(dtype: str, model_path: str | None = None, quantization: str = "auto",
                  device: str = "cpu") -> DtypeChoice:
    """The compute dtype. 'auto' takes float32 when the model's linear weights run on the project's
    quantized kernels (their arithmetic is integer or float32 whatever the dtype, and the C++ decode
    step is float32: faster than bfloat16 on an AVX512-BF16 host, benchmarks/RESULTS.md) or when they
    are int8 with int8 activations (smoothquant, llm.int8: the integer GEMM's result is float32), else
    bfloat16 where the CPU multiplies it natively, else float32.
    Norm statistics, softmax and sampling stay in float32 either way."""
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}
    if dtype != "auto":
        return DtypeChoice(aliases.get(dtype, dtype), "asked for")
    if device != "cpu":
        return DtypeChoice("bfloat16", f"auto: {device} device")
    if quantization in ACTIVATION_METHODS:  # from any source, so a folded norm is never rounded to bfloat16
        return DtypeChoice("float32", f"auto: {quantization}'s int8 matmuls return float32")
    if quantization != "none" and model_path is not None and runs_on_quantized_kernels(model_path):
        return DtypeChoice("float32", "auto: the weights run on the quantized kernels, whose float side is float32")
    from flashserve.cpu_info import cpu_info

    if cpu_info().native_bf16:
        return DtypeChoice("bfloat16", "auto: float weights and a CPU with native bfloat16 (AVX512-BF16 or AMX)")
    return DtypeChoice("float32", "auto: float weights and no native bfloat16 on this CPU")


def runs_on_quantized_kernels(model_path: str) -> bool:
    """True when most of the weights of a GGUF file's layers (by count) are of a type the packed
    kernels take (the embedding is left out: it is read by row, not multiplied), and for a GPTQ/AWQ
    checkpoint (its linears are 4-bit)."""
    if Path(model_path).is_dir():
        from flashserve.model.loader.hf import is_int4_checkpoint

        return is_int4_checkpoint(model_path)
    from flashserve.model.loader.gguf_file import open_gguf
    from flashserve.quantization.gguf_method import KERNEL_TYPES

    tensors = [t for t in open_gguf(model_path).tensors if len(t.shape) == 2 and t.name.startswith("blk.")]
    packed = sum(t.n_elements for t in tensors if t.tensor_type in KERNEL_TYPES)
    return 2 * packed > sum(t.n_elements for t in tensors)
