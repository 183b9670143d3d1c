"""A GGUF as the bf16 Hugging Face directory vLLM loads (vLLM's CPU build has no GGUF loader).

    python benchmarks/vllm_model.py smollm2-135m|FILE.gguf    # prints the directory

transformers dequantizes the GGUF (`from_pretrained(dir, gguf_file=...)`), and we write its state dict
as bf16 safetensors beside config.json, generation_config.json and the tokenizer files. It does not go
through `save_pretrained`, which refuses a GGUF-loaded model. The config loses its
quantization_config (the weights are plain bf16 now), and a tied lm_head is left out (the loader
ties it back to the embedding). The directory is cached under flashserve's cache, keyed by the GGUF's
name and size, and built in a temporary directory renamed into place, so an interrupted build is
never taken for a finished one.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

FORMAT = "bf16-v1"  # bump when the directory's contents change


def converted_dir(gguf: Path) -> Path:
    from flashserve.model.catalogue import cache_dir

    return cache_dir() / "vllm" / f"{gguf.stem}-{gguf.stat().st_size}-{FORMAT}"


def convert(gguf: str | Path) -> Path:
    """The bf16 directory for `gguf`, built on the first call."""
    gguf = Path(gguf).resolve()
    out = converted_dir(gguf)
    if (out / "config.json").exists():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # float32 is transformers' fast path for packed GGUF weights; the cast to bf16 comes below.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = model.config
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # Tied or shared tensors would make safetensors refuse the dict: give each name its own storage.
    seen: set[int] = set()
    for k, v in state.items():
        if v.untyped_storage().data_ptr() in seen:
            state[k] = v.clone()
        seen.add(state[k].untyped_storage().data_ptr())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = torch.bfloat16
        cfg.architectures = [type(model).__name__]
        cfg.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (out / "config.json").exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(out, ignore_errors=True)  # a leftover without config.json
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    from flashserve.model.catalogue import resolve

    print(convert(resolve(sys.argv[1])))


if __name__ == "__main__":
    main()
