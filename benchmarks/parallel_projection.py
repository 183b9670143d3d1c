"""What tensor parallelism over NVLink and pipeline parallelism over a 25 Gb/s network would give a
70B model, from a step model whose two costs were measured on this host (issue 18).

    python benchmarks/parallel_projection.py --step-1thread-ms X --tp2-step-ms Y --collective-us Z \
        [--collectives 62] [--weights-mib W]

The step model (decode, B sequences, weights read once a step, collectives paid by latency):

    one process:   t = W / bw                               W: weight bytes, bw: rate one rank reads them
    TP=N:          t = W / (N bw) + C (a + 2 (N-1)/N B d e / link)   C collectives, a: latency of one
    PP=P, one step in flight:  t = W / bw + (P-1) x         x = a_net + B d e 2 / net  (hidden and residual)
    PP=P, P micro-batches of B: one micro-batch done every max(W / (P bw), x) once the pipeline is full

Calibration here: bw from the measured one-thread step of SmolLM2 (benchmarks/tp_step_profile.py,
"1 process, 1 thread"), a from its measured shared-memory collectives; the model's TP=2 step is then
printed beside the measured one. The 70B figures swap in Llama-3-70B's shapes and the hardware
numbers below, which are the vendors' published specifications or stated assumptions, not
measurements of this project.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    weight_bytes: float


# Llama-3-70B: 80 layers, d = 8192, FFN 28672, 64 query / 8 KV heads of 128, vocabulary 128256: 70.6e9
# parameters (per layer 2 d^2 + 2 d 1024 + 3 d 28672; embedding and head 128256 d each).
LLAMA70B_PARAMS = 80 * (2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672) + 2 * 128256 * 8192
BF16 = Model("Llama-3-70B bf16", 80, 8192, LLAMA70B_PARAMS * 2)
Q4_K_M = Model("Llama-3-70B Q4_K_M (4.85 bits a weight)", 80, 8192, LLAMA70B_PARAMS * 4.85 / 8)

# Published figures, not measured here.
H100_HBM_BPS = 3.35e12 * 0.8  # HBM3 of an H100 SXM, 3.35 TB/s, at an assumed 80% reached by decode GEMVs
NVLINK_BPS = 450e9  # NVLink 4: 900 GB/s per GPU both ways, 450 one way
NVLINK_ALLREDUCE_S = 15e-6  # assumed latency of one small NCCL all-reduce over 8 NVLink GPUs
NET_BPS = 25e9 / 8  # 25 Gb/s Ethernet
NET_LATENCY_S = 50e-6  # assumed one-way latency of a TCP send between two nodes, software included


def tp_step(m: Model, n: int, batch: int, bw: float, latency: float, link: float, collectives: int) -> float:
    ring = 2 * (n - 1) / n * batch * m.hidden * 2 / link  # bf16 activations
    return m.weight_bytes / (n * bw) + collectives * (latency + ring)


def pp_steps(m: Model, p: int, batch: int, bw: float) -> tuple[float, float]:
    """(seconds a step of one micro-batch takes through all stages, tokens a second with p micro-batches
    of `batch` sequences in flight)."""
    transfer = NET_LATENCY_S + batch * m.hidden * 2 * 2 / NET_BPS
    stage = m.weight_bytes / (p * bw)
    return p * stage + (p - 1) * transfer, batch / max(stage, transfer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-1thread-ms", type=float, required=True, help="measured: one process, 1 thread, 1 seq")
    ap.add_argument("--tp2-step-ms", type=float, required=True, help="measured: 2 ranks, shared memory, 1 seq")
    ap.add_argument("--collective-us", type=float, required=True, help="measured: one shared-memory all-reduce")
    ap.add_argument("--collectives", type=int, default=62, help="collectives a TP step (SmolLM2: 2 x 30 + 2)")
    ap.add_argument("--weights-mib", type=float, default=None,
                    help="bytes a SmolLM2 step reads (default: its packed parameters, loaded here)")
    a = ap.parse_args()
    if a.weights_mib is None:
        from flashserve import LLM

        model = LLM(model="smollm2-135m").engine.runner.model
        a.weights_mib = sum(t.nbytes for t in [*model.parameters(), *model.buffers()]) / 2**20
    bw = a.weights_mib * 2**20 / (a.step_1thread_ms / 1e3)
    predicted = (a.step_1thread_ms / 2 + a.collectives * a.collective_us / 1e3)
    print(f"Calibration (SmolLM2-135M, {a.weights_mib:.0f} MiB read a step): one thread reads {bw / 1e9:.2f} GB/s; "
          f"TP=2 step predicted {predicted:.1f} ms = {a.step_1thread_ms:.1f} / 2 + {a.collectives} x "
          f"{a.collective_us:.0f} us, measured {a.tp2_step_ms:.1f} ms ({a.tp2_step_ms / predicted:.2f}x the model)")
    print("\n| model | layout | sequences a batch (micro-batch) | ms a step | tokens/s |")
    print("|---|---|---|---|---|")
    for m in (BF16, Q4_K_M):
        for n in (1, 8):
            if m is BF16 and n == 1:
                continue  # 141 GB does not fit one 80 GB GPU
            for batch in (1, 32):
                t = tp_step(m, n, batch, H100_HBM_BPS, NVLINK_ALLREDUCE_S, NVLINK_BPS, 2 * m.layers + 2)
                layout = "one H100" if n == 1 else f"TP={n} H100s, NVLink"
                print(f"| {m.name} | {layout} | {batch} | {t * 1e3:.2f} | {batch / t:.0f} |")
    for m, p in ((BF16, 2), (Q4_K_M, 2), (Q4_K_M, 4)):
        for batch in (1, 32):
            latency, rate = pp_steps(m, p, batch, H100_HBM_BPS)
            print(f"| {m.name} | PP={p} H100 nodes, 25 Gb/s | {batch} | {latency * 1e3:.2f} | "
                  f"{rate:.0f} ({p} micro-batches, {p * batch} sequences) |")
    for p in (2, 4):
        for batch in (1, 32):
            latency, rate = pp_steps(Q4_K_M, p, batch, bw)
            print(f"| {Q4_K_M.name} | PP={p} nodes reading weights at this host's one-thread rate, 25 Gb/s | "
                  f"{batch} | {latency * 1e3:.0f} | {rate:.2f} ({p} micro-batches, {p * batch} sequences) |")


if __name__ == "__main__":
    main()
