"""Qwen2.5-Coder-0.5B (14 query heads, 2 KV heads: one a rank) split over two ranks, by tensor and by
pipeline parallelism, against one process: its Q4_K_M weights stay packed (weight-only: float
activations, so the tokens do not hang on int8 rounding of a differently summed activation)."""
from __future__ import annotations

import pytest

from flashserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "def quicksort(xs):\n    ",
    "# Read a CSV file with pandas\nimport pandas as pd\n",
    "<|im_start|>user\nWrite a haiku about rust.<|im_end|>\n<|im_start|>assistant\n",
    "SELECT name FROM users WHERE",
    "fn main() {\n    let",
    "The three laws of thermodynamics are",
]


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_two_ranks_give_one_process_greedy_tokens(qwen05_gguf, layout):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = []
    for kwargs in ({}, layout):
        llm = LLM(model=qwen05_gguf, quantization="weight-only", max_model_len=256, **kwargs)
        try:
            outs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)])
        finally:
            llm.engine.shutdown()
    assert outs[1] == outs[0]
