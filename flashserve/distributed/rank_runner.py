"""One rank's model runner: the model (its part under tensor or pipeline parallelism), its KV cache
and its ModelRunner. Built in the engine's process for one rank, in each worker for several."""
from __future__ import annotations

import torch

from flashserve import heap, startup_phases
from flashserve.config import EngineConfig
from flashserve.huge_pages import allocations_in_huge_pages, collapse_weights
from flashserve.runner.model_runner import ModelRunner


def build_runner(config: EngineConfig, num_blocks: int, device: torch.device, guided,
                 eos_token_ids: tuple[int, ...], tp_group=None) -> ModelRunner:
    """The model (this rank's part of it under tensor or pipeline parallelism; `tp_group` is the group
    of all ranks either way), its KV cache and its runner.
    Every rank allocates the same number of blocks, so the scheduler's block ids mean the same
    slots on all of them; a rank's blocks hold its own KV heads."""
    from flashserve.model.weight_cache import weight_cache
    from flashserve.runner.kv_cache import allocate_kv_caches
    from flashserve.runner.kv_swap import allocate_swap_space, num_swap_slots

    cache = weight_cache(config, device, 1 if tp_group is None else tp_group.world_size)
    model = None if cache is None else cache.load(max_positions(config))
    if model is None:
        model, cfg = _load(config, device, tp_group)
        if cache is not None:
            cache.store(model, config.model_path)
    else:  # mapped from the cache file: in the page cache's pages, nothing to collapse
        from flashserve.model.loader.gguf_file import open_gguf

        cfg = config.model_config  # read from the file's header when the engine config was made
        # As after packing (load_model): the parsed header's vocabulary (tens of MiB of Python strings
        # for Gemma 3's 262k tokens) is not kept for the engine's lifetime.
        open_gguf.cache_clear()
        startup_phases.mark("weights mapped from the weight cache")
    streaming = config.max_weight_memory is not None  # layer streaming maps its large blocks instead
    if torch.device(device).type == "cpu" and not streaming:
        heap.reuse_large_blocks()
    kv_caches = allocate_kv_caches(cfg, num_blocks, config.cache.block_size, getattr(torch, config.dtype), device,
                                   config.cache.kv_cache_dtype)
    startup_phases.mark("KV cache reserved")
    # The C++ decode step runs all layers in one call, with no place for the all-reduces or transfers,
    # nor for layer streaming's hooks (it would hold the weights of every layer).
    return ModelRunner(model, kv_caches, config.cache.block_size, eos_token_ids, device, guided,
                       use_decode_plan=tp_group is None and not streaming,
                       swap_caches=allocate_swap_space(kv_caches, num_swap_slots(config)),
                       typical_acceptance=config.speculative.typical_acceptance)


def max_positions(config: EngineConfig) -> int:
    """The positions the rotary tables cover: the engine's context length."""
    return config.scheduler.max_model_len


def _load(config: EngineConfig, device: torch.device, tp_group):
    """(model, its ModelConfig) read and packed from the model file: this rank's part, its weights in
    their final form (tiles), in huge pages where asked."""
    from flashserve.model.loader import load_model

    dtype = getattr(torch, config.dtype)
    huge_pages = config.huge_pages and torch.device(device).type == "cpu"
    with allocations_in_huge_pages(huge_pages):
        model, cfg = load_model(config.model_path, dtype=dtype, device=device, quantization=config.quantization,
                                max_weight_memory=config.max_weight_memory, activation_quant=config.activation_quant,
                                hot_neurons=config.hot_neurons, max_positions=max_positions(config))
        if tp_group is not None and config.parallel.pipeline_parallel_size > 1:
            from flashserve.distributed.pipeline_parallel import split_stages

            cfg = split_stages(model, tp_group.rank, tp_group.world_size)
        elif tp_group is not None:
            from flashserve.distributed.partition import tp_shards
            from flashserve.distributed.tensor_parallel import shard_model

            cfg = shard_model(model, tp_shards(cfg, tp_group.world_size)[tp_group.rank], tp_group)
        _store_in_tiles(model, linears=config.max_weight_memory is None)
    heap.release_free_heap()  # the rows the tiles replaced, before collapsing makes their spans resident
    if huge_pages:
        collapse_weights(model)  # what was not born huge, of the rank's final weights (after any split)
        startup_phases.mark("weights mapped in huge pages")
    return model, cfg


def _store_in_tiles(model, linears: bool) -> None:
    """Weights in the tiled GEMM's own order where the build has it (GroupQuantWeight.to_wide_tiles),
    a rank's final ones, so after any split: the LM head, most of a batched step's 8-bit codes, and
    every 8-bit linear the tiled kernel takes, which then skips transposing codes and gathering scales
    per call (benchmarks/linear_kernels.py, RESULTS.md: 0.55-0.85x the time at 4 and 32 rows, the
    same at one). An embedding that is not the head keeps its rows (looked up, never multiplied);
    `linears` False under layer streaming, which reads the layers' weights back by rows."""
    from flashserve.model.layers.linear import Linear
    from flashserve.quantization.codebook_weight import CodebookWeight
    from flashserve.quantization.group_quant_weight import GroupQuantWeight
    from flashserve.quantization.packed import stacked_parts

    tileable = (GroupQuantWeight, CodebookWeight)
    head = model.head_weight()
    if isinstance(head, tileable):
        head.to_wide_tiles()
    for m in model.modules() if linears else []:
        if not isinstance(m, Linear) or m.qweight is None:
            continue
        for w in stacked_parts(m.qweight):
            if isinstance(w, tileable):
                w.to_wide_tiles()
