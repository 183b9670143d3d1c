"""The weight cache (flashserve/model/weight_cache.py): the first engine of a model file saves its packed
weights, the next maps them from that file; both compute what an engine that packs the file itself
computes, bit for bit. A changed model file gets a new entry, a broken entry is packed again, and the
configurations it cannot hold are never cached."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.engine.arg_utils import EngineArgs
from flashserve.model.weight_cache import weight_cache

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)


@pytest.fixture
def model_copy(smollm2_gguf, tmp_path):
    """A model file of this test's own (its entries are this test's to change), and its entries removed
    afterwards."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_gguf, path)
    made = entries_of(str(path))  # a function of the path alone: the file may be gone at the end
    yield str(path)
    remove(made())


def remove(entries: list[Path]) -> None:
    for entry in entries:
        entry.unlink(missing_ok=True)
        entry.with_suffix(".json").unlink(missing_ok=True)


def entry_of(model_path: str, **engine_args) -> Path:
    config = EngineArgs(model=model_path, **engine_args).create_engine_config()
    return weight_cache(config, torch.device("cpu"), 1).path


def entries_of(model_path: str):
    """A function listing every entry saved from this model file, whatever its key."""
    entry = entry_of(model_path)
    stem = entry.name.rsplit("-", 1)[0]
    return lambda: sorted(entry.parent.glob(f"{stem}-*.pt"))


def mapped_files(tensors) -> set[str]:
    """The files whose mappings (/proc/self/maps) hold the tensors' first bytes; "" for anonymous memory."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(v, 16) for v in fields[0].split("-"))
            spans.append((low, high, fields[5].strip() if len(fields) > 5 else ""))
    return {next((name for low, high, name in spans if low <= t.data_ptr() < high), "?") for t in tensors}


def generate(llm: LLM):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_the_second_engine_maps_what_the_first_saved_and_both_compute_as_a_fresh_pack(model_copy):
    packed = LLM(model=model_copy, max_num_seqs=2, max_model_len=512, weight_cache=False)
    assert entries_of(model_copy)() == []  # switched off: nothing saved
    first = LLM(model=model_copy, max_num_seqs=2, max_model_len=512)
    assert entries_of(model_copy)() == [entry_of(model_copy)]
    # another context length: the same entry, the rotary tables built for this engine's
    second = LLM(model=model_copy, max_num_seqs=2, max_model_len=256)
    fresh = LLM(model=model_copy, max_num_seqs=2, max_model_len=256, weight_cache=False)
    assert entries_of(model_copy)() == [entry_of(model_copy)]

    model = second.engine.runner.model
    weights = [p for p in model.parameters() if p.numel() > 0]
    assert mapped_files(weights) == {str(entry_of(model_copy))}  # every weight in the entry's pages
    assert mapped_files([p for p in first.engine.runner.model.parameters() if p.numel() > 0]) != {str(entry_of(model_copy))}
    reference = fresh.engine.runner.model.state_dict(keep_vars=True)
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name
    for name, buffer in model.named_buffers():  # the rotary tables, not in the state dict
        assert torch.equal(buffer, dict(fresh.engine.runner.model.named_buffers())[name]), name
    assert generate(first) == generate(second) == generate(packed) == generate(fresh)  # tokens and logprobs


def test_a_changed_model_file_gets_a_new_entry_and_its_old_one_goes(model_copy):
    LLM(model=model_copy, max_num_seqs=2)
    old = entry_of(model_copy)
    st = os.stat(model_copy)
    os.utime(model_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    new = entry_of(model_copy)
    assert new != old
    LLM(model=model_copy, max_num_seqs=2)
    assert entries_of(model_copy)() == [new] and not old.with_suffix(".json").exists()


def test_entries_of_a_model_file_that_is_gone_are_removed(model_copy, tmp_path):
    LLM(model=model_copy, max_num_seqs=2)
    gone = entry_of(model_copy)
    other = tmp_path / "other.gguf"
    shutil.copyfile(model_copy, other)
    of_other = entries_of(str(other))
    os.unlink(model_copy)
    try:
        LLM(model=str(other), max_num_seqs=2)
        assert not gone.exists() and not gone.with_suffix(".json").exists()
        assert of_other() == [entry_of(str(other))]
    finally:
        remove(of_other())


@pytest.mark.parametrize("damage", ["truncated", "not a model"])
def test_an_entry_that_does_not_load_is_packed_again_and_rewritten(model_copy, damage, caplog):
    expected = generate(LLM(model=model_copy, max_num_seqs=2, weight_cache=False))
    LLM(model=model_copy, max_num_seqs=2)
    entry = entry_of(model_copy)
    size = entry.stat().st_size
    if damage == "truncated":
        with open(entry, "r+b") as f:
            f.truncate(size // 2)
    else:
        torch.save({"weights": torch.zeros(3)}, entry)
    llm = LLM(model=model_copy, max_num_seqs=2)
    assert "does not load" in caplog.text
    assert generate(llm) == expected
    assert entry.stat().st_size == size  # written again, whole
    assert mapped_files([p for p in LLM(model=model_copy, max_num_seqs=2).engine.runner.model.parameters()
                         if p.numel() > 0]) == {str(entry)}


def test_what_is_not_cached(smollm2_gguf, tmp_path):
    def config(**kwargs):
        return EngineArgs(model=smollm2_gguf, **kwargs).create_engine_config()

    cpu = torch.device("cpu")
    assert weight_cache(config(), cpu, 1) is not None
    assert weight_cache(config(weight_cache=False), cpu, 1) is None
    assert weight_cache(config(max_weight_memory=300_000_000), cpu, 1) is None  # layer streaming
    assert weight_cache(config(), cpu, 2) is None  # one rank of several
    assert weight_cache(config(), torch.device("meta"), 1) is None  # not the CPU
    # the key follows what decides the packing
    assert len({weight_cache(config(**kw), cpu, 1).path for kw in
                ({}, {"quantization": "weight-only"}, {"quantization": "none"}, {"dtype": "bfloat16"})}) == 4
    # SmoothQuant's smoothing comes from its calibration text: an edited text is another key
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox. " * 50)
    smooth = dict(quantization="smoothquant", calibration_text=str(text))
    before = weight_cache(config(**smooth), cpu, 1).path
    text.write_text("Another text, another set of activation maxima. " * 50)
    assert weight_cache(config(**smooth), cpu, 1).path != before


def test_the_switch_reaches_the_engine_config(smollm2_gguf):
    from flashserve.entrypoints.cli import build_parser
    from flashserve.entrypoints.cli_flags import engine_args_from

    on = engine_args_from(build_parser().parse_args(["generate", "--model", smollm2_gguf, "--prompt", "x"]))
    off = engine_args_from(build_parser().parse_args(["serve", "--model", smollm2_gguf, "--no-weight-cache"]))
    assert on.create_engine_config().weight_cache and not off.create_engine_config().weight_cache
