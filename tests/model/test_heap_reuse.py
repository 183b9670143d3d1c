"""Large temporaries reuse freed heap memory once a CPU engine is built (heap.reuse_large_blocks):
glibc's default gives every block above its mmap threshold (at most 32 MiB) a fresh mapping, so a
decode step's 33.5 MiB of logits (Gemma 3, 32 sequences) faulted in every page anew. Measured as
the operating system counts it, minor page faults, in a process of its own (malloc's settings are
the whole process's)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys, torch
def faults_per_cycle(cycles=16):  # allocate, write and free a 40 MiB block, as a step does its logits
    out = []
    for _ in range(cycles):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(40 << 20, dtype=torch.uint8); x.fill_(1); small = torch.ones(100); del x
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out
out = {"plain": faults_per_cycle()}
from flashserve import LLM
llm = LLM(model=sys.argv[1], max_model_len=256, max_num_seqs=2)
out["engine"] = faults_per_cycle()
print(json.dumps(out))
"""


@pytest.mark.usefixtures("cpp_kernels")
def test_a_cpu_engine_reuses_freed_large_blocks(smollm2_gguf):
    """The first cycles after start-up may fault: they carve the block out of free heap that start-up
    handed back to the system (malloc_trim); from then on the freed block is reused."""
    done = subprocess.run([sys.executable, "-c", PROBE, smollm2_gguf], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    pages = (40 << 20) // 4096
    assert all(f > pages // 2 for f in faults["plain"][-4:]), faults  # glibc's default: every page anew
    assert sum(faults["engine"][-4:]) < pages // 2, faults
