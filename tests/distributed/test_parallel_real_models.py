"""Real models split over two ranks, by tensor parallelism (worker processes, and Ray actors on a
local Ray instance) and by pipeline parallelism, against one process: Qwen2.5-Coder-0.5B (14 query
heads, 2 KV heads: one a rank) and SmolLM2-135M through Ray (the other layouts of SmolLM2 are in
test_tp_smollm2.py and test_pipeline_parallel.py). The files' K-quant and Q4_1 weights stay packed
(weight-only: float activations, so the tokens do not hang on int8 rounding of a differently summed
activation)."""
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
TP2 = dict(tensor_parallel_size=2)
PP2 = dict(pipeline_parallel_size=2)
TP2_RAY = dict(tensor_parallel_size=2, distributed_executor_backend="ray", worker_timeout_s=120)


@pytest.fixture(scope="module")
def local_ray():
    import ray  # in the test extra, as in test_ray.py

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def greedy(model: str, **kwargs) -> list[list[int]]:
    llm = LLM(model=model, quantization="weight-only", max_model_len=256, **kwargs)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def qwen_one_process(qwen05_gguf):
    return greedy(qwen05_gguf)


@pytest.mark.parametrize("layout", [TP2, PP2], ids=["tp2", "pp2"])
def test_qwen_two_ranks_give_one_process_greedy_tokens(qwen05_gguf, qwen_one_process, layout):
    assert greedy(qwen05_gguf, **layout) == qwen_one_process


@pytest.mark.parametrize("model", ["smollm2", "qwen05"])
def test_tp2_through_ray_gives_one_process_greedy_tokens(local_ray, smollm2_gguf, qwen05_gguf, qwen_one_process,
                                                         model):
    path = smollm2_gguf if model == "smollm2" else qwen05_gguf
    one = greedy(path) if model == "smollm2" else qwen_one_process
    assert greedy(path, **TP2_RAY) == one
