"""flashserve: LLM inference and serving.

Public names are imported lazily so that `flashserve.core` (pure bookkeeping) can be
used without pulling in torch and the model stack.
"""
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name == "LLM":
        from flashserve.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from flashserve.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from flashserve import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'flashserve' has no attribute {name!r}")
