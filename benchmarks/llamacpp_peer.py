"""llama.cpp as a peer, through llama-cpp-python's low-level API: the prompts of every stream are
prefilled through llama_batch, then one llama_decode a step decodes one token of every stream, each
stream its own sequence id (the high-level Llama runs one sequence). Greedy: the argmax of the logits
llama.cpp returns for the step, read as one (streams, vocab) array."""
from __future__ import annotations

import ctypes
import time

import numpy as np

# llama.cpp's own defaults (llama_context_default_params, llama-bench): logical batch 2048, physical 512.
N_BATCH, N_UBATCH = 2048, 512


class LlamaCppBatched:
    """One model and one context of `n_seqs` sequence ids x `n_ctx` cells; `resize` makes a new
    context for another shape, keeping the model."""

    def __init__(self, path: str, n_seqs: int, n_ctx: int, threads: int, quiet: bool = True, use_mmap: bool = True):
        """`use_mmap`: map the file (llama.cpp's default) or read the weights into memory."""
        import llama_cpp as lc

        self.lc, self.threads, self.ctx, self.batch, self.shape = lc, threads, None, None, None
        if quiet:  # llama.cpp logs every tensor it loads to stderr otherwise
            self._log_cb = lc.llama_log_callback(lambda level, text, data: None)
            lc.llama_log_set(self._log_cb, ctypes.c_void_p())
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.use_mmap = use_mmap
        self.model = lc.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.resize(n_seqs, n_ctx)

    def resize(self, n_seqs: int, n_ctx: int) -> None:
        """A context of n_seqs sequences sharing n_ctx cells (each sequence its own KV stream, the
        default kv_unified=false); flash attention, KV types and swa_full stay at llama.cpp's defaults.
        Same threads for generation and for batches (n_threads, n_threads_batch)."""
        if self.shape == (n_seqs, n_ctx):
            return
        self._free_context()
        lc = self.lc
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, N_BATCH, N_UBATCH, n_seqs
        cp.n_threads = cp.n_threads_batch = self.threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_seqs} sequences x {n_ctx} cells")
        self.batch = lc.llama_batch_init(max(N_BATCH, n_seqs), 0, 1)
        self.shape = (n_seqs, n_ctx)

    def _free_context(self) -> None:
        if self.ctx is not None:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.ctx, self.batch, self.shape = None, None, None

    def close(self) -> None:
        self._free_context()
        self.lc.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """entries: (token, pos, seq, want_logits); one llama_decode; the greedy next token of every
        entry that wants logits, in entry order."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed (KV cache full?)")
        n_out = sum(e[3] for e in entries)
        if not n_out:
            return []
        ptr = ctypes.cast(self.lc.llama_get_logits(self.ctx), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, (n_out, self.n_vocab)).argmax(axis=1).tolist()  # (outputs, vocab)

    def run(self, prompts: list[list[int]], gen: int) -> dict:
        """Prefill all prompts (packed into n_batch chunks), then decode `gen` tokens for all of them."""
        if len(prompts) > self.shape[0]:
            raise ValueError(f"{len(prompts)} prompts on a context of {self.shape[0]} sequences")
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        pending = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        nxt: list[int] = []
        for i in range(0, len(pending), N_BATCH):
            nxt += self._decode(pending[i : i + N_BATCH])
        t1 = time.perf_counter()
        for step in range(gen - 1):
            nxt = self._decode([(tok, len(p) + step, s, True) for s, (tok, p) in enumerate(zip(nxt, prompts))])
        t2 = time.perf_counter()
        n = len(prompts)
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0,
                "prompt_tok_s": sum(map(len, prompts)) / (t1 - t0),
                "decode_tok_s": n * (gen - 1) / (t2 - t1) if gen > 1 else None,
                "throughput_tok_s": n * gen / (t2 - t0)}
