"""Frozen configuration for one engine instance.

Everything that changes behaviour lives here and is validated once at start-up;
no environment-variable flags and no getattr-with-default elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts of a decoder-only model, read from GGUF metadata or config.json."""

    architecture: str  # "llama" | "qwen2" | "gemma3" (registry key)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int  # the model's context length
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    hidden_act: str = "silu"  # "silu" (SwiGLU) | "gelu_pytorch_tanh" (GeGLU, Gemma)
    # Gemma 3 specifics (None / defaults for other families).
    sliding_window: int | None = None
    # Per layer: True when the layer uses sliding-window attention.
    layer_is_sliding: tuple[bool, ...] = ()
    rope_local_theta: float | None = None  # RoPE base of sliding layers
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default head_dim)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.layer_is_sliding and len(self.layer_is_sliding) != self.num_layers:
            raise ValueError("layer_is_sliding must have one entry per layer")

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    def sliding_window_of(self, layer: int) -> int | None:
        if self.layer_is_sliding and self.layer_is_sliding[layer]:
            return self.sliding_window
        return None


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Bytes of KV cache to allocate; None = derive from kv_cache_fraction of available RAM.
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.25
    # "auto" (float16 under float32 compute, else the compute dtype: attention/kv_quant.py) |
    # "float32" | "float16" | "bfloat16" (read as the compute dtype) | "int8"
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    # Bytes of host memory for the KV blocks of preempted requests (core/swap_space.py); 0 = none.
    swap_space: int = 0

    def validate(self) -> None:
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 bytes, got {self.swap_space}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if not 0.0 < self.kv_cache_fraction <= 0.9:
            raise ValueError("kv_cache_fraction must be in (0, 0.9]")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}")


SCHEDULING_CHOICES = ("continuous", "static")
POLICY_CHOICES = ("fcfs", "priority")  # priority: lower value first, then arrival
# What preemption does with a victim's KV: recompute it later, swap it to host memory (recompute
# when the swap space is full), or "auto": swap when that costs less (core/swap_space.py).
PREEMPTION_MODES = ("auto", "recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 64
    max_model_len: int = 2048  # longest prompt + output accepted
    scheduling: str = "continuous"  # "continuous" | "static"
    policy: str = "fcfs"  # "fcfs" | "priority"
    preemption_mode: str = "auto"  # PREEMPTION_MODES

    def validate(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.scheduling not in SCHEDULING_CHOICES:
            raise ValueError(f"unknown scheduling {self.scheduling!r}")
        if self.policy not in POLICY_CHOICES:
            raise ValueError(f"unknown policy {self.policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"unknown preemption_mode {self.preemption_mode!r}; "
                             f"choose from {', '.join(PREEMPTION_MODES)}")


SPECULATIVE_METHODS = ("ngram", "draft_model", "medusa", "eagle")
HEAD_METHODS = ("medusa", "eagle")  # drafting from the target's own hidden states, with heads trained here
ACCEPTANCE_RULES = ("rejection", "typical")  # how drafts of sampling requests are verified (rejection_sampler.py)


@dataclass(frozen=True)
class TypicalAcceptance:
    """Medusa's typical acceptance (Cai et al. 2024, section 2.3.1): a draft d is accepted when the
    target's p(d) > min(posterior_threshold, posterior_alpha * exp(-H(p))). Defaults: the Medusa
    authors' own settings (epsilon 0.09, delta 0.3)."""

    posterior_threshold: float = 0.09  # epsilon: the hard threshold
    posterior_alpha: float = 0.3  # delta: scales the entropy-dependent threshold


@dataclass(frozen=True)
class SpecHeadsConfig:
    """What a heads file (spec_decode/heads.py: .safetensors plus a .json beside it) says about itself:
    the method it was trained for and the target's sizes it fits. Medusa: num_heads residual blocks;
    EAGLE: one decoder layer of the attention shape below (the target's, by default)."""

    method: str  # "medusa" | "eagle"
    hidden_size: int
    vocab_size: int
    num_heads: int = 1  # Medusa heads (EAGLE: 1 layer, drafting autoregressively)
    num_attention_heads: int = 0  # EAGLE's layer
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    target: str = ""  # the model the heads were trained on, as the training run named it


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (spec_decode/): None = off; "ngram" = prompt lookup, drafting from
    earlier matches of the last prompt_lookup_min..prompt_lookup_max tokens; "draft_model" = a
    smaller model with the target's vocabulary (`model`, resolved to draft_model_path) drafting
    greedily. Up to num_speculative_tokens drafts per request and step, verified by the target
    (losslessly, unless acceptance="typical"). `adaptive`: each request drafts as many as pay off at
    its own acceptance rate, none when none do (spec_decode/draft_length.py); `draft_cost`
    overrides the estimated cost of a draft as a fraction of a plain step; `disable_by_batch_size`:
    no drafts while that many requests run.
    `acceptance`: how the drafts of sampling requests (temperature > 0) are verified: "rejection"
    (lossless rejection sampling) or "typical" (Medusa's typical acceptance with posterior_threshold
    and posterior_alpha, TypicalAcceptance: NOT lossless, the output distribution changes, in
    exchange for more accepted drafts). Greedy requests are verified exactly either way."""

    method: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None  # the draft model (or heads file of medusa/eagle) as the user named it
    draft_model_path: str | None = None  # resolved file or directory
    draft_model_config: ModelConfig | None = None
    heads_config: SpecHeadsConfig | None = None  # medusa/eagle: the heads file's own description
    adaptive: bool = True
    draft_cost: float | None = None  # None: estimated per method (draft_length.estimate_draft_cost)
    disable_by_batch_size: int | None = None
    acceptance: str = "rejection"
    posterior_threshold: float | None = None  # typical acceptance only; None: TypicalAcceptance's default
    posterior_alpha: float | None = None

    @property
    def typical_acceptance(self) -> TypicalAcceptance | None:
        """The typical-acceptance rule when chosen, else None (lossless rejection sampling)."""
        if self.acceptance != "typical":
            return None
        given = {k: v for k, v in (("posterior_threshold", self.posterior_threshold),
                                   ("posterior_alpha", self.posterior_alpha)) if v is not None}
        return TypicalAcceptance(**given)

    @property
    def samples_drafts(self) -> bool:
        """Whether Medusa and EAGLE draw the drafts of sampling requests from their heads' q (which
        rejection sampling takes into account, keeping the target's distribution). Typical acceptance
        judges a draft by the target's p alone, so there the heads' most likely token is drafted, as
        Medusa does."""
        return self.acceptance == "rejection"

    @property
    def uses_target_hidden_states(self) -> bool:
        """The proposer drafts from the target's last hidden states, which the runner then hands over."""
        return self.method in HEAD_METHODS

    def validate(self) -> None:
        self._validate_acceptance()
        if self.method is None:
            return
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose from {', '.join(SPECULATIVE_METHODS)}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.draft_cost is not None and not self.draft_cost >= 0:
            raise ValueError(f"draft_cost must be >= 0, got {self.draft_cost}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.method == "draft_model" and self.draft_model_config is None:
            raise ValueError("speculative method 'draft_model' needs a draft model: speculative_config's 'model' "
                             "(or speculative_model, --speculative-model)")
        if self.method in HEAD_METHODS:
            self._validate_heads()
        elif self.method != "draft_model" and self.model is not None:
            raise ValueError(f"a draft model is for method 'draft_model', not {self.method!r}")

    def _validate_acceptance(self) -> None:
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"unknown speculative acceptance {self.acceptance!r}; "
                             f"choose from {', '.join(ACCEPTANCE_RULES)}")
        tuned = [k for k in ("posterior_threshold", "posterior_alpha") if getattr(self, k) is not None]
        if tuned and self.acceptance != "typical":
            raise ValueError(f"{' and '.join(tuned)} set the typical acceptance rule: add acceptance='typical'")
        if self.method is None and self.acceptance != "rejection":
            raise ValueError(f"acceptance {self.acceptance!r} verifies drafts: it needs a speculative method")
        if self.posterior_threshold is not None and not 0.0 <= self.posterior_threshold <= 1.0:
            raise ValueError(f"posterior_threshold (epsilon, a probability) must be in [0, 1], "
                             f"got {self.posterior_threshold}")
        if self.posterior_alpha is not None and not 0.0 <= self.posterior_alpha < float("inf"):
            raise ValueError(f"posterior_alpha (delta) must be a finite number >= 0, got {self.posterior_alpha}")

    def _validate_heads(self) -> None:
        heads = self.heads_config
        if heads is None:
            raise ValueError(f"speculative method {self.method!r} needs its heads file: speculative_config's "
                             "'model' (a .safetensors written by python -m flashserve.spec_decode.train)")
        if heads.method != self.method:
            raise ValueError(f"{self.model} holds {heads.method} heads, not {self.method} ones")
        if self.method == "medusa" and self.num_speculative_tokens > heads.num_heads:
            raise ValueError(f"{self.model} has {heads.num_heads} Medusa heads: num_speculative_tokens="
                             f"{self.num_speculative_tokens} needs as many")


EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """tensor_parallel_size ranks run one model (distributed/); the scheduler stays in the engine.
    distributed_executor_backend: "uni" runs the model in the engine's process (only for one rank),
    "mp" in worker processes, one per rank, "ray" in Ray actors, one per rank, placed over the nodes
    of a Ray cluster; None picks "uni" for one rank, else "mp".
    worker_timeout_s: the longest the workers may take to start or to run one step before the
    engine declares one of them hung, stops them all and raises."""

    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    worker_timeout_s: float = 300.0
    pipeline_parallel_size: int = 1  # stages of layers, one rank each (not combined with tensor parallelism)
    # Steps in flight at once under pipeline parallelism, each over its own share of the requests;
    # None: one per stage, so that every stage has a micro-batch to work on (EngineConfig.steps_in_flight).
    pipeline_micro_batches: int | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def answer_rank(self) -> int:
        """The rank whose RunnerOutput the engine takes: the last pipeline stage (it has the logits)."""
        return self.world_size - 1 if self.pipeline_parallel_size > 1 else 0

    @property
    def backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"

    def validate(self, model: ModelConfig, cores: int) -> None:
        from flashserve.distributed.partition import tp_shards

        from flashserve.distributed.pipeline_parallel import PP_ARCHITECTURES

        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if pp < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp}")
        if pp > 1 and tp > 1:
            raise ValueError("pipeline_parallel_size and tensor_parallel_size cannot both exceed 1 yet")
        if self.pipeline_micro_batches is not None and self.pipeline_micro_batches < 1:
            raise ValueError(f"pipeline_micro_batches must be >= 1, got {self.pipeline_micro_batches}")
        if pp > 1 and (model.architecture not in PP_ARCHITECTURES or pp > model.num_layers):
            raise ValueError(f"pipeline_parallel_size={pp} needs a {' or '.join(PP_ARCHITECTURES)} model of at "
                             f"least {pp} layers; this is {model.architecture} with {model.num_layers}")
        if self.backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"unknown distributed_executor_backend {self.backend!r}; "
                             f"choose from {', '.join(EXECUTOR_BACKENDS)}")
        if self.backend == "uni" and self.world_size != 1:
            raise ValueError(f"distributed_executor_backend 'uni' runs one rank; {self.world_size} ranks need 'mp'")
        if self.backend == "mp" and self.world_size > cores:  # Ray's placement group checks the cluster's own
            what = f"tensor_parallel_size={tp}" if pp == 1 else f"pipeline_parallel_size={pp}"
            raise ValueError(f"{what} exceeds the {cores} CPU cores this process may use: "
                             "each rank needs a core of its own")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be positive, got {self.worker_timeout_s}")
        tp_shards(model, tp)  # raises when the model's heads or sizes do not split over tp ranks


# "weight-only": a GGUF file's quantized weights run packed on the int4/int8 CPU kernels where a
# kernel takes their type (flashserve/quantization/gguf_method.py), activations stay float;
# "auto": the same, and the project's kernel rounds activations to int8 per group of 32 for integer
# dot products (llama.cpp's arithmetic); "none": dequantize every weight to dtype.
# "smoothquant", "llm.int8": a float model (GGUF dequantized, or an HF directory) whose decoder linears
# become int8 weights times int8-rounded activations at load (flashserve/quantization/activation_methods.py).
ACTIVATION_METHODS = ("smoothquant", "llm.int8")
QUANTIZATION_CHOICES = ("auto", "weight-only", "none", *ACTIVATION_METHODS)


@dataclass(frozen=True)
class ActivationQuantConfig:
    """Options of the ACTIVATION_METHODS; each method reads only its own."""
    smoothquant_alpha: float = 0.5  # migration strength (SmoothQuant eq. 4)
    calibration_text: str | None = None  # SmoothQuant's activation maxima: a text file; None: GPL-3's text
    smoothquant_down_proj: bool = False  # also smooth down_proj's input, folded into up_proj's rows
    llm_int8_threshold: float = 6.0  # |x| from which an input column takes LLM.int8()'s float path

    def validate(self, quantization: str) -> None:
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if not self.llm_int8_threshold > 0:
            raise ValueError(f"llm_int8_threshold must be positive, got {self.llm_int8_threshold}")
        default = ActivationQuantConfig()
        mine = {"smoothquant": ("smoothquant_alpha", "calibration_text", "smoothquant_down_proj"),
                "llm.int8": ("llm_int8_threshold",)}
        for method, names in mine.items():
            for name in names:
                if quantization != method and getattr(self, name) != getattr(default, name):
                    raise ValueError(f"{name} is an option of quantization={method!r}, not of {quantization!r}")


@dataclass(frozen=True)
class HotNeuronConfig:
    """Hot/cold FFN neurons (offload/hot_cold.py): a profile written by `flashserve profile-neurons`,
    and whether its predictor skips the cold neurons it predicts inactive (exact or off)."""
    profile: str | None = None  # the profile file; None: off
    hot_fraction: float = 0.2  # of each layer's neurons, always computed
    predictor: bool = False
    max_disagreement: float = 0.0  # fraction of greedy check tokens skipping may change before the model runs dense

    def validate(self, quantization: str) -> None:
        if self.profile is None:
            if (self.hot_fraction, self.predictor, self.max_disagreement) != (0.2, False, 0.0):
                raise ValueError("hot_neuron_fraction, neuron_predictor and neuron_predictor_max_disagreement "
                                 "are options of hot_neuron_profile, which is not set")
            return
        if not 0.0 <= self.hot_fraction <= 1.0:
            raise ValueError(f"hot_neuron_fraction must be in [0, 1], got {self.hot_fraction}")
        if not 0.0 <= self.max_disagreement <= 1.0:
            raise ValueError(f"neuron_predictor_max_disagreement must be in [0, 1], got {self.max_disagreement}")
        if quantization != "none":
            raise ValueError(f"hot_neuron_profile reorders float MLP rows: it needs quantization='none', "
                             f"not {quantization!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # what the user passed (path or catalogue name)
    model_path: str  # resolved file or directory
    model_config: ModelConfig
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    quantization: str = "auto"  # QUANTIZATION_CHOICES
    activation_quant: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    seed: int = 0
    num_threads: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Bytes of weights resident at once; None: all. Decoder layers beyond it stream (offload/).
    max_weight_memory: int | None = None
    hot_neurons: HotNeuronConfig = field(default_factory=HotNeuronConfig)
    # Resident CPU weights remapped with 2 MiB pages at start-up (huge_pages.py): faster decode steps
    # for a start-up longer by the remapping. Layer streaming's buffers are left alone.
    huge_pages: bool = True
    # The packed weights saved by the first start and memory-mapped by the next (model/weight_cache.py).
    weight_cache: bool = True

    def validate(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}; use float32 or bfloat16")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose from {', '.join(QUANTIZATION_CHOICES)}")
        self.activation_quant.validate(self.quantization)
        if self.quantization in ACTIVATION_METHODS and (self.max_weight_memory is not None
                                                        or self.parallel.world_size > 1):
            raise ValueError(f"quantization={self.quantization!r} runs in one process with every weight resident: "
                             "it cannot be combined with max_weight_memory or tensor/pipeline parallelism yet")
        self.hot_neurons.validate(self.quantization)
        if self.hot_neurons.profile is not None and (self.max_weight_memory is not None
                                                     or self.parallel.world_size > 1):
            raise ValueError("hot_neuron_profile runs in one process with every weight resident: it cannot be "
                             "combined with max_weight_memory or tensor/pipeline parallelism yet")
        self.cache.validate()
        self.scheduler.validate()
        if self.max_weight_memory is not None:
            self._validate_weight_budget()
        if self.scheduler.preemption_mode == "swap" and self.cache.swap_space == 0:
            raise ValueError("preemption_mode 'swap' needs a swap space: set swap_space (bytes)")
        self.speculative.validate()
        self.parallel.validate(self.model_config, usable_cores())
        heads, mc = self.speculative.heads_config, self.model_config
        if heads is not None and (heads.hidden_size, heads.vocab_size) != (mc.hidden_size, mc.vocab_size):
            raise ValueError(
                f"the {heads.method} heads {self.speculative.model} were trained for hidden size {heads.hidden_size} "
                f"and a vocabulary of {heads.vocab_size} tokens (target {heads.target or 'unnamed'}), but {self.model} "
                f"has hidden size {mc.hidden_size} and {mc.vocab_size} tokens: train heads for this model")
        draft = self.speculative.draft_model_config
        if draft is not None and draft.vocab_size != self.model_config.vocab_size:
            raise ValueError(
                f"the draft model {self.speculative.model} has a vocabulary of {draft.vocab_size} tokens but the "
                f"target {self.model} has {self.model_config.vocab_size}: a draft must share the target's vocabulary"
            )


    @property
    def steps_in_flight(self) -> int:
        """How many steps the engine keeps in flight, each over its own micro-batch of requests (GPipe's
        micro-batches, Huang et al. 2019): under pipeline parallelism one per stage by default, so stage
        s works on one while stage s + 1 works on another. One otherwise, and under speculative decoding
        (its proposer reads each step's result before drafting for the next)."""
        par = self.parallel
        if par.pipeline_parallel_size == 1 or self.speculative.method is not None:
            return 1
        return par.pipeline_micro_batches or par.pipeline_parallel_size

    def _validate_weight_budget(self) -> None:
        from pathlib import Path

        if self.max_weight_memory <= 0:
            raise ValueError(f"max_weight_memory must be a positive number of bytes, got {self.max_weight_memory}")
        if Path(self.model_path).is_dir():
            raise ValueError("max_weight_memory streams layers from a GGUF file; "
                             f"{self.model_path} is a checkpoint directory")
        if self.parallel.world_size > 1:
            raise ValueError("max_weight_memory runs in one process: it cannot be combined with tensor or "
                             "pipeline parallelism yet")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
