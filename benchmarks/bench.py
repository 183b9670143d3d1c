"""The CPU fast-path table: prompt processing, single-stream decode and decode at 1..64 concurrent
sequences, flashserve beside llama.cpp and transformers on one GGUF, each figure with its achieved
GB/s and GFLOP/s as a fraction of the machine's peaks measured in the same run.

    python benchmarks/bench.py [--model smollm2-135m] [--engines flashserve,llamacpp,transformers]
        [--concurrency 1,4,16,32,64] [--prompt-len 128] [--gen-len 128] [--pp-len 512]
        [--hf-dtypes float32,bfloat16] [--hf-max-concurrency 16] [--plot benchmarks/bench.png] [--repeats 1] [--quick]

Decode tok/s means the same for every engine: the tokens generated after every sequence has its
first token, divided by the time since that moment (prompts are prefilled before it, so neither
prefill nor the first token is counted). Prompt processing: prompt tokens / time to the first token.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import have, header, measure_ceilings, set_threads, table
from roofline import ModelFacts, decode_roofline, prefill_roofline

SINGLE_PROMPT_LEN = 32  # the single-stream row's prompt, as in decode.py
QUICK = dict(pp_len=32, prompt_len=16, gen_len=8, concurrency="1,4")  # --quick: a smoke test


def _elem_bytes(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def _bytes_per_weight(model: torch.nn.Module, facts: ModelFacts) -> float:
    """What a torch model spends on one of the file's weights, as it holds them (quantized or not)."""
    return sum(p.nbytes for p in model.parameters()) / facts.params


class Engine:
    """What each engine offers; prompts are token ids, decoding is greedy with EOS ignored."""
    label: str
    note: str  # what its figures are, printed above the table
    weight_bytes: float  # weight bytes read per decode step
    kv_elem_bytes: float
    max_concurrency: int

    def batched(self, prompts: list[list[int]], gen: int) -> dict:
        """Prefill all prompts, decode `gen` tokens for each: {'prefill_s', 'decode_tok_s'}."""
        raise NotImplementedError

    def prefill_s(self, prompt: list[int]) -> float:
        return self.batched([prompt], 1)["prefill_s"]

    def single(self, prompt: list[int], gen: int) -> dict:
        return self.batched([prompt], gen)

    def close(self) -> None:
        pass


class Flashserve(Engine):
    """One engine for every row: continuous batching, prefix caching off (the prompts are random
    anyway), a token budget that prefills all of a row's prompts in one step."""

    def __init__(self, path: str, facts: ModelFacts, a):
        from flashserve import LLM

        self.llm = LLM(model=path, dtype=a.dtype, num_threads=a.threads, enable_prefix_caching=False,
                       max_num_seqs=max(a.concurrency), max_model_len=a.context,
                       max_num_batched_tokens=max(2048, a.pp_len, max(a.concurrency) * a.prompt_len))
        dtype = self.llm.engine.config.dtype
        bytes_per_weight = _bytes_per_weight(self.llm.engine.runner.model, facts)
        self.weight_bytes = facts.matmul_params * bytes_per_weight
        self.kv_elem_bytes = _elem_bytes(dtype)
        self.label = f"flashserve {dtype}"
        self.note = (f"{self.label}: one LLM engine (continuous batching, max_num_seqs {max(a.concurrency)}), "
                     f"weights {bytes_per_weight:.2f} bytes each")
        self.max_concurrency = max(a.concurrency)
        self.batched([[1000 + i for i in range(16)]] * 2, 4)  # warm-up

    def batched(self, prompts: list[list[int]], gen: int) -> dict:
        from flashserve import SamplingParams

        eng = self.llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
        for p in prompts:
            eng.add_request(eng.next_request_id(), {"prompt_token_ids": p}, params)
        made: dict[str, int] = {}
        t0, t1, at_t1 = time.perf_counter(), None, 0
        while eng.has_unfinished_requests():
            for out in eng.step():
                made[out.request_id] = len(out.outputs[0].token_ids)
            if t1 is None and len(made) == len(prompts) and all(made.values()):
                t1, at_t1 = time.perf_counter(), sum(made.values())
        t2 = time.perf_counter()
        decoded = len(prompts) * gen - at_t1
        return {"prefill_s": t1 - t0, "decode_tok_s": decoded / (t2 - t1) if decoded else None}

    def close(self) -> None:
        del self.llm


class Transformers(Engine):
    """`generate` on the same GGUF (dequantized by transformers): a static batch of that many
    sequences (equal-length prompts, no padding); the single stream is one sequential `generate`."""

    def __init__(self, path: str, facts: ModelFacts, a, dtype: str):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        p = Path(path)
        self.model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=getattr(torch, dtype)).eval()
        bytes_per_weight = _bytes_per_weight(self.model, facts)
        self.weight_bytes = facts.matmul_params * bytes_per_weight
        self.kv_elem_bytes = _elem_bytes(dtype)
        self.label = f"transformers {dtype}"
        self.note = (f"{self.label}: generate, one call for all the row's sequences (a static batch; "
                     f"rows above {a.hf_max_concurrency} sequences skipped, --hf-max-concurrency), "
                     f"weights {bytes_per_weight:.2f} bytes each")
        self.max_concurrency = a.hf_max_concurrency
        self.batched([[1000 + i for i in range(16)]] * 2, 4)  # warm-up

    def batched(self, prompts: list[list[int]], gen: int) -> dict:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class FirstToken(StoppingCriteria):  # called once per generated token: notes the first one's time
            t = None

            def __call__(self, input_ids, scores, **kwargs):
                self.t = self.t or time.perf_counter()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        ids, first = torch.tensor(prompts), FirstToken()
        with torch.no_grad():
            t0 = time.perf_counter()
            self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=gen,
                                min_new_tokens=gen, pad_token_id=0, stopping_criteria=StoppingCriteriaList([first]))
            t2 = time.perf_counter()
        decoded = len(prompts) * (gen - 1)
        return {"prefill_s": first.t - t0, "decode_tok_s": decoded / (t2 - first.t) if decoded else None}

    def close(self) -> None:
        del self.model


class LlamaCpp(Engine):
    """llama.cpp through llama-cpp-python: batched rows on one context of max(--concurrency)
    sequence ids (llamacpp_peer.py), the single stream through the high-level `Llama` (decode.py)."""

    def __init__(self, path: str, facts: ModelFacts, a):
        from llamacpp_peer import LlamaCppBatched

        self.path, self.threads = path, a.threads
        n = max(a.concurrency)
        self.many = LlamaCppBatched(path, n, n * (a.prompt_len + a.gen_len + 8) + 64, a.threads)
        self.one = LlamaCppBatched(path, 1, a.pp_len + 64, a.threads)  # prompt processing
        self.weight_bytes = facts.matmul_gguf_bytes
        self.kv_elem_bytes = 2  # its default f16 KV cache
        self.label = "llama.cpp"
        self.note = (f"llama.cpp {importlib.metadata.version('llama-cpp-python')} (llama-cpp-python): batched rows "
                     f"through llama_batch with one sequence id a stream; single stream through Llama.eval; "
                     f"weights as the file stores them ({facts.matmul_gguf_bytes / facts.matmul_params:.2f} "
                     f"bytes each), f16 KV")
        self.max_concurrency = n
        for peer in (self.many, self.one):
            peer.run([[1000 + i for i in range(16)]], 4)  # warm-up

    def batched(self, prompts: list[list[int]], gen: int) -> dict:
        return self.many.run(prompts, gen)

    def prefill_s(self, prompt: list[int]) -> float:
        return self.one.run([prompt], 1)["prefill_s"]

    def single(self, prompt: list[int], gen: int) -> dict:
        from decode import bench_llamacpp

        return bench_llamacpp(self.path, prompt, gen, self.threads)

    def close(self) -> None:
        self.many.close()
        self.one.close()


def llamacpp_runs() -> bool:
    """Whether llama.cpp starts here: a build for another CPU (AVX-512 on an AVX2 host) dies of
    SIGILL in its backend's start-up, which must not take the whole benchmark with it."""
    probe = "import llama_cpp; llama_cpp.llama_backend_init()"
    return have("llama_cpp") and subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def row_keys(a) -> list:
    """The table's rows: 'pp', 'single' and each concurrency."""
    return ["pp", "single", *a.concurrency]


def measure_row(engine: Engine, key, facts: ModelFacts, ceil: dict, a, prompts: dict):
    """(tok/s, roofline text) of one engine on one row (the median of a.repeats runs), or None
    when the engine skips that concurrency."""
    if key == "pp":
        log(f"{engine.label}: prompt processing, {a.pp_len} tokens")
        # One untimed run first, as llama-bench does: the first prompt of this length pays for
        # one-off allocations (attention workspaces, activation buffers) in every engine.
        engine.prefill_s(prompts["pp"])
        tok_s = statistics.median(a.pp_len / engine.prefill_s(prompts["pp"]) for _ in range(a.repeats))
        return tok_s, prefill_roofline(facts, ceil, tok_s, a.pp_len)
    if key == "single":
        seqs, prompt_len = 1, SINGLE_PROMPT_LEN
        run = lambda: engine.single(prompts["single"], a.gen_len)  # noqa: E731
    elif key <= engine.max_concurrency:
        seqs, prompt_len = key, a.prompt_len
        run = lambda: engine.batched(prompts["batch"][:key], a.gen_len)  # noqa: E731
    else:
        return None
    log(f"{engine.label}: decode, {'single stream' if key == 'single' else f'concurrency {seqs}'}")
    tok_s = statistics.median(run()["decode_tok_s"] for _ in range(a.repeats))
    return tok_s, decode_roofline(facts, ceil, tok_s, seqs, prompt_len + a.gen_len / 2, engine.weight_bytes,
                                  engine.kv_elem_bytes)


def build_table(a, labels: list[str], results: dict) -> str:
    names = {"pp": f"prompt processing, {a.pp_len} tokens",
             "single": f"decode, single stream (prompt {SINGLE_PROMPT_LEN})",
             **{c: f"decode, {c} sequence{'s' * (c > 1)} (prompt {a.prompt_len})" for c in a.concurrency}}
    ours = next((x for x in labels if x.startswith("flashserve")), None)
    peers = [x for x in labels if x != ours] if ours else []
    columns = (["measure"] + [f"{x} tok/s" for x in labels] + [f"flashserve / {x}" for x in peers]
               + [f"{x}: GB/s, GFLOP/s (% of peak)" for x in labels])
    rows = []
    for key, name in names.items():
        row = {"measure": name}
        for x in labels:
            tok_s, roof = results[x].get(key, (None, "skipped" if key in a.concurrency else None))
            row[f"{x} tok/s"], row[f"{x}: GB/s, GFLOP/s (% of peak)"] = tok_s, roof
        for x in peers:
            mine, theirs = results[ours].get(key, (None,))[0], results[x].get(key, (None,))[0]
            row[f"flashserve / {x}"] = mine / theirs if mine and theirs else None
        rows.append(row)
    return table(rows, columns)


def plot(path: str, a, labels: list[str], results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x in labels:
        pts = [(c, results[x][c][0]) for c in a.concurrency if c in results[x]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=x)
    ax.set_xscale("log", base=2)
    ax.set_xticks(a.concurrency, [str(c) for c in a.concurrency])
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("decode tok/s (all sequences)")
    ax.set_title(f"{Path(a.path).name}, prompt {a.prompt_len}, {a.gen_len} generated, {a.threads} threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a .gguf file or a built-in name")
    ap.add_argument("--engines", default="flashserve,llamacpp,transformers", help="which to run, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--dtype", default="auto", help="flashserve compute dtype")
    ap.add_argument("--hf-dtypes", default="float32", help="transformers compute dtypes, e.g. float32,bfloat16")
    ap.add_argument("--hf-max-concurrency", type=int, default=16, help="larger rows are skipped for transformers")
    ap.add_argument("--pp-len", type=int, default=512, help="prompt tokens of the prompt-processing row")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of each decoding sequence")
    ap.add_argument("--gen-len", type=int, default=128, help="tokens generated by each sequence")
    ap.add_argument("--concurrency", default="1,4,16,32,64", help="decode rows: sequences decoded together")
    ap.add_argument("--plot", default=str(Path(__file__).with_name("bench.png")), help="PNG of decode tok/s by concurrency")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every row per engine; the median is reported")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (the numbers mean nothing)")
    a = ap.parse_args(argv)
    if a.quick:
        vars(a).update(QUICK)
    a.ceiling_s = 0.2 if a.quick else 1.0
    a.concurrency = sorted({int(c) for c in a.concurrency.split(",")})
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    unknown = set(a.engines) - {"flashserve", "llamacpp", "transformers"}
    if unknown or a.gen_len < 2 or min(a.concurrency) < 1:
        ap.error(f"unknown engines {sorted(unknown)}" if unknown else "--gen-len must be >= 2, concurrencies >= 1")
    a.context = max(a.pp_len + 1, SINGLE_PROMPT_LEN + a.gen_len, a.prompt_len + a.gen_len) + 16
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    set_threads(a.threads)
    from flashserve.model.catalogue import resolve

    a.path = str(resolve(a.model))
    if not a.path.endswith(".gguf"):
        sys.exit("bench.py compares the engines on one GGUF file: pass a .gguf path or a built-in name")
    facts = ModelFacts.from_gguf(a.path)
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, min(30000, facts.cfg.vocab_size)) for _ in range(n)]

    prompts = {"pp": prompt(a.pp_len), "single": prompt(SINGLE_PROMPT_LEN),
               "batch": [prompt(a.prompt_len) for _ in range(max(a.concurrency))]}
    log("measuring the machine's bandwidth and matmul peaks")
    ceil = measure_ceilings(a.ceiling_s)

    makers = []
    if "flashserve" in a.engines:
        makers.append(lambda: Flashserve(a.path, facts, a))
    if "llamacpp" in a.engines:
        if llamacpp_runs():
            makers.append(lambda: LlamaCpp(a.path, facts, a))
        else:
            log("llama.cpp skipped: llama-cpp-python is not installed (make bench installs it) "
                "or was built for instructions this CPU lacks")
    if "transformers" in a.engines:
        makers += [lambda d=d: Transformers(a.path, facts, a, d) for d in a.hf_dtypes.split(",")]
    engines = []
    for make in makers:
        log("loading an engine")
        engines.append(make())
    labels, notes = [e.label for e in engines], [e.note for e in engines]
    results = {e.label: {} for e in engines}
    # Row by row, every engine back to back: this host's speed drifts by 20% over minutes, and
    # measuring one engine's whole table before the next put that drift into the ratios.
    for key in row_keys(a):
        for engine in engines:
            got = measure_row(engine, key, facts, ceil, a, prompts)
            if got is not None:
                results[engine.label][key] = got
    for engine in engines:
        engine.close()

    header("CPU fast path: prompt processing and decode, flashserve beside its peers",
           model=f"{a.model} ({Path(a.path).name}, {facts.cfg.architecture}, {facts.params / 1e6:.0f}M parameters, "
                 f"{facts.matmul_params / 1e6:.0f}M multiplied per token; file weights {facts.weight_types})",
           sizes=f"prompt processing {a.pp_len} tokens; decode {a.gen_len} tokens a sequence after a "
                 f"{a.prompt_len}-token prompt (single stream: {SINGLE_PROMPT_LEN}), greedy, EOS ignored, "
                 f"random prompts",
           ceilings=f"memory read {ceil['mem_GBps']:.1f} GB/s, matmul bf16 {ceil['bf16_GFLOPs']:.0f} / fp32 "
                    f"{ceil['fp32_GFLOPs']:.0f} GFLOP/s (peak = the higher), measured in this run",
           decode="tokens generated after every sequence has its first token / time since then",
           roofline="a decode step reads the multiplied weights (at the bytes each that the engine stores) and "
                    "every sequence's K/V at the mean context; a token costs 2 x multiplied weights + attention FLOPs",
           versions=f"transformers {importlib.metadata.version('transformers')}, python {sys.version.split()[0]}")
    print("engines:")
    print("\n".join(f"- {note}" for note in notes))
    print()
    print(build_table(a, labels, results))
    if any(results[x] for x in labels):
        plot(a.plot, a, labels, results)
        print(f"\nplot: {a.plot}")


if __name__ == "__main__":
    main()
