"""Weights in huge pages from start-up (flashserve/huge_pages.py): the kernel's own account
(/proc/self/smaps) shows the weights' memory in huge pages afterwards, the loader's allocator gives
large blocks aligned huge-page mappings and gives them back when freed, and nothing the engine
computes changes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.huge_pages import HUGE_PAGE, allocations_in_huge_pages, collapse_supported, thp_mode


def huge_bytes_of_mappings_holding(addresses: list[int]) -> tuple[int, int]:
    """(AnonHugePages, Size) summed over the process's mappings that hold any of `addresses`, in bytes."""
    huge = size = 0
    current = None  # (start, end) of the mapping whose fields follow
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(v, 16) for v in head.split("-"))
                current = (low, high) if any(low <= a < high for a in addresses) else None
                if current:
                    size += high - low
            elif current and head == "AnonHugePages:":
                huge += int(line.split()[1]) * 1024
    return huge, size


def weights_and_huge_pages(model_path: str, huge_pages: bool) -> dict:
    """An engine started in a process of its own, as a user's (earlier tests of this one change how
    glibc places large blocks, layer streaming's map_large_blocks): its weight bytes, the spans that
    qualify for huge pages, and the huge-page bytes of the mappings holding them."""
    script = f"""
import json
from flashserve import LLM
from flashserve.huge_pages import weight_spans
from tests.model.test_huge_pages import huge_bytes_of_mappings_holding
model = LLM(model={model_path!r}, max_num_seqs=2, huge_pages={huge_pages}, weight_cache=False).engine.runner.model
spans = weight_spans(model)
print(json.dumps({{"spans": len(spans), "huge": huge_bytes_of_mappings_holding(spans)[0],
                  "weights": sum(p.nbytes for p in dict.fromkeys(model.parameters()))}}))
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_weights_are_in_huge_pages(smollm2_gguf):
    if not collapse_supported():
        pytest.skip("this kernel does not collapse anonymous memory into huge pages (MADV_COLLAPSE, Linux 6.1)")
    got = weights_and_huge_pages(smollm2_gguf, huge_pages=True)
    assert got["spans"] * HUGE_PAGE >= 0.8 * got["weights"]  # most of the weights lie in spans that qualify
    # the kernel may refuse a span (one crossing a mapping's end, one busy at the time): a few at most
    assert got["huge"] >= 0.9 * got["spans"] * HUGE_PAGE
    if thp_mode() != "always":
        off = weights_and_huge_pages(smollm2_gguf, huge_pages=False)  # without asking, normal pages
        assert off["huge"] < 0.5 * off["spans"] * HUGE_PAGE


def test_large_blocks_are_born_in_huge_pages_and_unmapped_when_freed(cpp_kernels):
    if thp_mode() == "never":
        pytest.skip("transparent huge pages are off on this system")
    with allocations_in_huge_pages():
        block = torch.arange(3 * HUGE_PAGE // 4, dtype=torch.int32)  # 3 MiB: one whole huge page, a tail
        small = torch.ones(1000)
    address = block.data_ptr()
    assert address % HUGE_PAGE == 0
    assert huge_bytes_of_mappings_holding([address])[0] >= HUGE_PAGE
    assert block[-1].item() == 3 * HUGE_PAGE // 4 - 1 and small.sum().item() == 1000  # values as written
    moved = [block.clone() for _ in range(3)]  # after the block: torch's own allocator again, whose
    assert any(m.data_ptr() % HUGE_PAGE for m in moved)  # blocks start wherever malloc puts them
    assert all(torch.equal(m, torch.arange(3 * HUGE_PAGE // 4, dtype=torch.int32)) for m in moved)
    del block
    assert huge_bytes_of_mappings_holding([address])[1] == 0  # no mapping holds it: back to the system


def test_raw_allocations_go_through_either_way(cpp_kernels):
    """Some of torch's kernels (oneDNN's scratch buffers of a bfloat16 batched matmul) allocate and
    free raw blocks through the installed allocator's raw deleter: with this allocator on or off
    after its first use, they run (a missing raw deleter aborts the process)."""
    a, b = torch.randn(4, 3, 3, 64).bfloat16(), torch.randn(4, 3, 64, 48).bfloat16()
    want = torch.einsum("nhgd,nhdl->nhgl", a.double(), b.double())
    with allocations_in_huge_pages():
        inside = torch.matmul(a, b)
    after = torch.matmul(a, b)
    for got in (inside, after):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-1)


def test_outputs_do_not_change(smollm2_gguf):
    with_pages = LLM(model=smollm2_gguf, max_num_seqs=2, weight_cache=False)  # packed, both
    without = LLM(model=smollm2_gguf, max_num_seqs=2, huge_pages=False, weight_cache=False)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    a, b = (llm.generate(prompts, params, use_tqdm=False) for llm in (with_pages, without))
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].logprobs == y.outputs[0].logprobs  # the same floats, bit for bit


def test_the_switch_reaches_the_engine_config(smollm2_gguf):
    from flashserve.engine.arg_utils import EngineArgs
    from flashserve.entrypoints.cli import build_parser
    from flashserve.entrypoints.cli_flags import engine_args_from

    on = engine_args_from(build_parser().parse_args(["serve", "--model", smollm2_gguf]))
    off = engine_args_from(build_parser().parse_args(["serve", "--model", smollm2_gguf, "--no-huge-pages"]))
    assert on.create_engine_config().huge_pages and not off.create_engine_config().huge_pages
    streamed = EngineArgs(model=smollm2_gguf, max_weight_memory=300_000_000).create_engine_config()
    assert not streamed.huge_pages  # layer streaming's buffers stay in normal pages
