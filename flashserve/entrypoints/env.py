"""`flashserve env`: what this machine offers and what the engine chooses on it, with the reasons
(also the head of `flashserve bench`)."""
from __future__ import annotations

import os
import platform


def environment_report(model: str | None = None, dtype: str = "auto", quantization: str = "auto") -> list[str]:
    """Lines of `name: value`; `model` (a path or built-in name) adds the dtype chosen for it."""
    import torch

    from flashserve.cpu_info import cpu_info
    from flashserve.kernels.build import KernelBuildError, build_cpu_kernels, engine_level, supported_levels
    from flashserve.engine.arg_utils import resolve_dtype

    cpu = cpu_info()
    lines = [
        f"cpu: {cpu.model_name} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)",
        f"features: {' '.join(cpu.features) or 'none that the kernels use'}",
        f"native bfloat16: {'yes' if cpu.native_bf16 else 'no'}",
        f"software: python {platform.python_version()}, torch {torch.__version__}",
    ]
    try:
        build_cpu_kernels()
        levels = ", ".join(lv.name for lv in supported_levels(cpu))
        choice = engine_level()
        lines.append(f"C++ kernels: level {choice.level.name}, {choice.reason} ({levels})")
    except KernelBuildError as exc:
        lines.append(f"C++ kernels: unavailable, torch implementations in use ({str(exc).splitlines()[0]})")
    from flashserve.huge_pages import collapse_supported, thp_mode

    pages = ("weights remapped with 2 MiB pages at start-up" if collapse_supported()
             else "unavailable, weights in 4 KiB pages (the kernel has no MADV_COLLAPSE, Linux 6.1)")
    lines.append(f"huge pages: {pages} (transparent_hugepage: {thp_mode()})")
    if model is not None:
        from flashserve.model.catalogue import resolve

        choice = resolve_dtype(dtype, str(resolve(model)), quantization)
        lines.append(f"dtype for {model}: {choice.dtype} ({choice.reason})")
    return lines
