"""Train Medusa heads or an EAGLE layer for a target model by self-distillation (heads.py).

    python -m flashserve.spec_decode.train --model smollm2-135m --method medusa --out heads/smollm2-medusa.safetensors
    flashserve train-heads ...                 (the same)

1. The target writes the training text itself: flashserve's engine (LLM.generate, batched) answers
   the prompts of train_prompts.txt (or --prompts), chat-formatted, once per --temperatures entry.
   Heads learn what this model says, not what some corpus says (Medusa's self-distillation, Cai et
   al. 2024 section 3.3).
2. The same model, as the engine loads it (same quantization), recomputes every position of prompt +
   answer in one prefill per batch: its last hidden states (after the final norm) are the features.
3. Training, with the target frozen (its LM head and embedding dequantized to float32):
   medusa: head i at position j learns the target's token j + i + 2 (cross-entropy, head i weighted
           0.8^i as in Medusa's loss), for j from the last prompt position on;
   eagle:  the layer learns f_{j+1} from (f_j, t_{j+1}) (smooth L1) and the token after it through
           the LM head (cross-entropy, weight 0.1; EAGLE section 4.2), with uniform noise on its
           input features so it tolerates its own predictions when drafting.
   AdamW, cosine learning rate. A tenth of the answers is held out: the printed (and saved) top-1
   accuracies on it estimate the acceptance rate of greedy drafting.
4. The weights go to --out (.safetensors) and a .json beside it, which the engine reads.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flashserve.spec_decode.heads import build_heads, heads_config_for, save_heads

PROMPTS_FILE = Path(__file__).with_name("train_prompts.txt")
MEDUSA_DECAY = 0.8  # weight of head i: 0.8^i (Medusa-1's loss, section 2.2)
EAGLE_CLS_WEIGHT = 0.1  # EAGLE: L = L_reg + 0.1 L_cls
EAGLE_NOISE = 0.1  # half-width of the uniform noise on input features (EAGLE's data augmentation)


@dataclass
class Sample:
    tokens: list[int]  # prompt + the target's answer
    prompt_len: int
    features: torch.Tensor  # (len(tokens), d) the target's last hidden states


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flashserve train-heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the target: a catalogue name or a path")
    p.add_argument("--method", choices=["medusa", "eagle"], default="medusa")
    p.add_argument("--out", required=True, help="the .safetensors to write (its .json goes beside it)")
    p.add_argument("--num-heads", type=int, default=4, help="Medusa heads (drafts at most this many tokens)")
    p.add_argument("--prompts", default=str(PROMPTS_FILE), help="one prompt per line")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=192, help="answer length per prompt")
    p.add_argument("--temperatures", default="0,0.7", help="one answer per prompt at each temperature")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (medusa), 3e-4 (eagle)")
    p.add_argument("--batch-size", type=int, default=None, help="positions (medusa, default 256) or "
                                                                "answers (eagle, default 4) per step")
    p.add_argument("--no-chat", action="store_true", help="feed prompts raw instead of through the chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default="auto", help="as the engine that will use the heads")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the engine's")
    a = p.parse_args(argv)
    if a.num_heads < 1 or a.epochs < 1 or a.max_tokens < 4:
        p.error("--num-heads and --epochs must be >= 1 and --max-tokens >= 4")
    a.lr = a.lr or (1e-3 if a.method == "medusa" else 3e-4)
    a.batch_size = a.batch_size or (256 if a.method == "medusa" else 4)
    return a


def read_prompts(path: str, limit: int | None) -> list[str]:
    lines = [s.strip() for s in Path(path).read_text().splitlines()]
    prompts = [s for s in lines if s and not s.startswith("#")][:limit]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return prompts


def generate(a) -> tuple[list[list[int]], list[int]]:
    """The target's own answers: (prompt + answer token ids, prompt lengths)."""
    from flashserve import LLM, SamplingParams

    llm = LLM(a.model, quantization=a.quantization, max_model_len=a.max_model_len, seed=a.seed)
    tok = llm.get_tokenizer()
    texts = read_prompts(a.prompts, a.num_prompts)
    if not a.no_chat:  # tokenized as the engine tokenizes any text prompt
        texts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    seqs, plens = [], []
    for i, temp in enumerate(float(t) for t in a.temperatures.split(",")):
        params = SamplingParams(temperature=temp, max_tokens=a.max_tokens, seed=a.seed + i)
        print(f"generating {len(texts)} answers at temperature {temp}")
        for o in llm.generate(texts, params):
            seqs.append(list(o.prompt_token_ids) + list(o.outputs[0].token_ids))
            plens.append(len(o.prompt_token_ids))
    del llm
    return seqs, plens


@torch.inference_mode()
def target_features(model, mc, seqs: list[list[int]], budget: int = 2048, block_size: int = 16) -> list[torch.Tensor]:
    """(len, d) last hidden states of every position of each sequence, prefilled in batches of ≤ budget tokens
    (a longer sequence alone) on a paged KV cache of its own, as the engine computes them."""
    from flashserve.core.sched_output import ScheduledRequest
    from flashserve.runner.input_batch import build_model_inputs
    from flashserve.runner.kv_cache import allocate_kv_caches
    from flashserve.sampling_params import SamplingParams

    longest = max(len(s) for s in seqs)
    num_blocks = (max(budget, longest) + block_size - 1) // block_size + len(seqs) + 1  # block 0 stays unused
    model.bind_kv_caches(allocate_kv_caches(mc, num_blocks, block_size, model.dtype, torch.device("cpu"), "auto"))
    greedy = SamplingParams(temperature=0.0)
    out: list[torch.Tensor] = []
    i = 0
    with tqdm(total=len(seqs), desc="features") as bar:
        while i < len(seqs):
            batch, used, next_block = [], 0, 1
            while i < len(seqs) and (not batch or used + len(seqs[i]) <= budget):
                n = len(seqs[i])
                nb = (n + block_size - 1) // block_size
                batch.append(ScheduledRequest(str(i), seqs[i], 0, n, list(range(next_block, next_block + nb)), greedy, []))
                used, next_block, i = used + n, next_block + nb, i + 1
            inputs = build_model_inputs(batch, block_size, torch.device("cpu"))
            hidden = model(inputs.input_ids, inputs.positions, inputs.attn_metadata).float()  # (T, d)
            starts = inputs.attn_metadata.query_start_loc_cpu
            out += [hidden[starts[j] : starts[j + 1]].clone() for j in range(len(batch))]
            bar.update(len(batch))
    return out


def float_weight(module) -> torch.Tensor:
    """A Linear's or embedding's weight (rows, d) as float32, dequantized when packed."""
    return (module.qweight.dequantize() if module.qweight is not None else module.weight).detach().float()


class FrozenTarget:
    """The target's LM head (and embedding) in float32, for gradients to flow through."""

    def __init__(self, model):
        self.embedding = float_weight(model.model.embed_tokens)  # (vocab, d)
        self.head = self.embedding if model.lm_head is None else float_weight(model.lm_head)  # (vocab, d)
        self.softcap = model.config.final_logit_softcap

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.head.T
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z


def medusa_data(samples: list[Sample], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X (N, d): features at positions j >= prompt_len - 1 (a drafting step's row); Y (N, k): the token at
    j + i + 2 for head i, -100 past the end."""
    xs, ys = [], []
    for s in samples:
        T, lo = len(s.tokens), s.prompt_len - 1
        if T - 2 <= lo:
            continue
        tok = torch.tensor(s.tokens + [-100] * (k + 1))
        j = torch.arange(lo, T - 2)
        xs.append(s.features[j])
        ys.append(torch.stack([tok[j + i + 2] for i in range(k)], dim=1))
    return torch.cat(xs), torch.cat(ys)


def fit_medusa(heads, target: FrozenTarget, train: list[Sample], held: list[Sample], a) -> dict:
    k = heads.weight.shape[0]
    X, Y = medusa_data(train, k)
    weights = [MEDUSA_DECAY ** i for i in range(k)]
    steps = a.epochs * math.ceil(len(X) / a.batch_size)
    opt = torch.optim.AdamW(heads.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(a.seed)
    with tqdm(total=steps, desc=f"medusa x{k} on {len(X)} positions") as bar:
        for _ in range(a.epochs):
            for b in torch.randperm(len(X), generator=gen).split(a.batch_size):
                logits = target.logits(heads(X[b]))  # (k, B, vocab)
                loss = sum(w * F.cross_entropy(logits[i], Y[b, i], ignore_index=-100) for i, w in enumerate(weights))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    return medusa_accuracy(heads, target, held)


@torch.no_grad()
def medusa_accuracy(heads, target: FrozenTarget, held: list[Sample]) -> dict:
    """Per head, the top-1 accuracy on held-out answers, and how often heads 0..i are all right (the
    chance that greedy verification accepts i + 1 drafts)."""
    k = heads.weight.shape[0]
    X, Y = medusa_data(held, k)
    right = torch.cat([(target.logits(heads(x)).argmax(-1) == y.T) for x, y in
                       zip(X.split(512), Y.split(512))], dim=1)  # (k, N)
    valid = (Y != -100).T
    chain = torch.cumprod(right.int(), dim=0).bool()
    return {"head_top1": [round(float(right[i][valid[i]].float().mean()), 4) for i in range(k)],
            "chain_top1": [round(float(chain[i][valid[i]].float().mean()), 4) for i in range(k)],
            "held_out_positions": int(valid[0].sum())}


def eagle_batch(batch: list[Sample], target: FrozenTarget, noise: float, gen=None):
    """Padded tensors of a batch: input features and next-token embeddings (B, T-1, d), the features to
    regress (B, T-1, d) with their mask, and the token labels of rows 0..T-3 (-100: prompt, padding)."""
    T = max(len(s.tokens) for s in batch)
    d = batch[0].features.shape[1]
    feats = torch.zeros(len(batch), T, d)
    toks = torch.zeros(len(batch), T, dtype=torch.int64)
    labels = torch.full((len(batch), T), -100, dtype=torch.int64)
    mask = torch.zeros(len(batch), T, dtype=torch.bool)
    for b, s in enumerate(batch):
        n = len(s.tokens)
        feats[b, :n], toks[b, :n], mask[b, :n] = s.features, torch.tensor(s.tokens), True
        labels[b, s.prompt_len : n] = toks[b, s.prompt_len : n]
    inp = feats[:, :-1]
    if noise:
        inp = inp + (torch.rand(inp.shape, generator=gen) * 2 - 1) * noise
    return inp, target.embedding[toks[:, 1:]], feats[:, 1:], mask[:, 1:], labels[:, 2:]


def fit_eagle(layer, target: FrozenTarget, train: list[Sample], held: list[Sample], a) -> dict:
    order = sorted(range(len(train)), key=lambda i: len(train[i].tokens))  # similar lengths pad little
    batches = [order[i : i + a.batch_size] for i in range(0, len(order), a.batch_size)]
    steps = a.epochs * len(batches)
    opt = torch.optim.AdamW(layer.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng, gen = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
    with tqdm(total=steps, desc=f"eagle on {sum(len(s.tokens) for s in train)} positions") as bar:
        for _ in range(a.epochs):
            rng.shuffle(batches)
            for idx in batches:
                inp, emb, want, mask, labels = eagle_batch([train[i] for i in idx], target, EAGLE_NOISE, gen)
                out, _ = layer(inp, emb, torch.arange(inp.shape[1]))
                reg = F.smooth_l1_loss(out[mask], want[mask])
                cls = F.cross_entropy(target.logits(out[:, :-1]).flatten(0, 1), labels.flatten(), ignore_index=-100)
                loss = reg + EAGLE_CLS_WEIGHT * cls
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(reg=f"{reg.item():.3f}", cls=f"{cls.item():.3f}")
                bar.update()
    return eagle_accuracy(layer, target, held)


@torch.no_grad()
def eagle_accuracy(layer, target: FrozenTarget, held: list[Sample]) -> dict:
    """Top-1 accuracy of the first draft on held-out answers, from the target's true features."""
    right = total = 0
    for s in held:
        inp, emb, _, _, labels = eagle_batch([s], target, 0.0)
        out, _ = layer(inp, emb, torch.arange(inp.shape[1]))
        valid = labels != -100
        right += int((target.logits(out[:, :-1]).argmax(-1) == labels)[valid].sum())
        total += int(valid.sum())
    return {"first_draft_top1": round(right / max(total, 1), 4), "held_out_positions": total}


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    seqs, plens = generate(a)
    train_heads(a, seqs, plens, t0)


def train_heads(a, seqs: list[list[int]], plens: list[int], t0: float) -> None:
    """Steps 2-4 on the target's answers (prompt + answer token ids, prompt lengths)."""
    from flashserve.model.catalogue import resolve
    from flashserve.model.loader import load_model

    model, mc = load_model(str(resolve(a.model)), dtype=torch.float32, quantization=a.quantization)
    feats = target_features(model, mc, seqs)
    samples = [Sample(s, p, f.clone()) for s, p, f in zip(seqs, plens, feats)]  # clone: out of inference mode
    random.Random(a.seed).shuffle(samples)
    held_n = max(1, len(samples) // 10)
    held, train = samples[:held_n], samples[held_n:] or samples[:held_n]
    target = FrozenTarget(model)
    del model
    cfg = heads_config_for(a.method, mc, a.model, a.num_heads if a.method == "medusa" else 1)
    module = build_heads(cfg).train()
    fit = fit_medusa if a.method == "medusa" else fit_eagle
    stats = fit(module, target, train, held, a)
    info = {"answers": len(samples), "tokens": sum(len(s) for s in seqs),
            "answer_tokens": sum(len(s) - p for s, p in zip(seqs, plens)), "epochs": a.epochs, "lr": a.lr,
            "max_tokens": a.max_tokens, "temperatures": a.temperatures, "seconds": round(time.perf_counter() - t0, 1),
            **stats}
    save_heads(a.out, module, cfg, info)
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.json').name}: {stats}")


if __name__ == "__main__":
    main()
