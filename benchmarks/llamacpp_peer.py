"""llama.cpp as a peer, through llama-cpp-python's low-level API: many sequences decoded together,
one llama_decode per step with one sequence id per stream (the high-level Llama runs one sequence)."""
from __future__ import annotations

import ctypes
import time

import numpy as np


class LlamaCppBatched:
    def __init__(self, path: str, n_seqs: int, n_ctx: int, threads: int, n_batch: int = 512):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_seq_max = n_seqs
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_batch = max(n_batch, n_seqs)
        self.batch = lc.llama_batch_init(self.n_batch, 0, n_seqs)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """entries: (token, pos, seq, want_logits); returns greedy next tokens of the rows wanting logits."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed (KV cache full?)")
        out = []
        for i, (_, _, _, want) in enumerate(entries):
            if want:
                ptr = self.lc.llama_get_logits_ith(self.ctx, i)
                logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,))
                out.append(int(logits.argmax()))
        return out

    def run(self, prompts: list[list[int]], gen: int) -> dict:
        """Prefill all prompts (packed into n_batch chunks), then decode `gen` tokens for all of them."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        pending = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        nxt: list[int] = []
        for i in range(0, len(pending), self.n_batch):
            nxt += self._decode(pending[i : i + self.n_batch])
        t1 = time.perf_counter()
        for step in range(gen - 1):
            nxt = self._decode([(tok, len(p) + step, s, True) for s, (tok, p) in enumerate(zip(nxt, prompts))])
        t2 = time.perf_counter()
        n = len(prompts)
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0,
                "prompt_tok_s": sum(map(len, prompts)) / (t1 - t0), "decode_tok_s": n * (gen - 1) / (t2 - t1),
                "throughput_tok_s": n * gen / (t2 - t0)}
