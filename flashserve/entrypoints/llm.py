"""Offline batch generation in vLLM's shape: LLM(model=...).generate(prompts, params)."""
from __future__ import annotations

import time
from collections.abc import Sequence

from tqdm import tqdm

from flashserve.engine.arg_utils import EngineArgs
from flashserve.engine.llm_engine import LLMEngine
from flashserve.outputs import RequestOutput
from flashserve.sampling_params import SamplingParams


class LLM:
    """`LLM(model="smollm2-135m", dtype="float32", ...)`; keyword arguments are EngineArgs fields."""

    def __init__(self, model: str = "smollm2-135m", **engine_kwargs):
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **engine_kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in prompt order. A prompt is a string, a list of token ids,
        or a dict with 'prompt' or 'prompt_token_ids'."""
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        priorities = _per_prompt(priority if priority is not None else 0, len(prompts), "priority")
        ids = []
        for prompt, p, prio in zip(prompts, params, priorities):
            if p.use_beam_search:
                ids.append(None)
                continue
            rid = self.engine.next_request_id()
            self.engine.add_request(rid, prompt, p, priority=prio)
            ids.append(rid)
        sampled = iter(self._run([rid for rid in ids if rid is not None], use_tqdm))
        # Beam-search prompts run afterwards, one search at a time, on the idle engine.
        return [next(sampled) if rid is not None else self._beam_output(prompt, p)
                for rid, prompt, p in zip(ids, prompts, params)]

    def _beam_output(self, prompt, p: SamplingParams) -> RequestOutput:
        """SamplingParams(use_beam_search=True): beam width max(n, best_of); the n best finished
        sequences, best first, as one RequestOutput (stop strings and logprobs do not apply)."""
        from flashserve.engine.beam_search import BeamSearchParams, beam_request_output, beam_search

        text, ids = self.engine.input_processor.tokenize(prompt)
        room = self.engine.config.scheduler.max_model_len - len(ids)
        width = max(p.n, p.best_of or 1)
        bp = BeamSearchParams(width, min(p.max_tokens or room, room), p.length_penalty, p.early_stopping,
                              p.guided_decoding)
        result = beam_search(self.engine, ids, bp, self.engine.eos_token_ids)
        return beam_request_output(self.engine, self.engine.next_request_id(), text, ids, result, p.n,
                                   p.skip_special_tokens)

    def beam_search(self, prompts, params) -> list:
        """Beam search (see engine/beam_search.py): one BeamSearchOutput per prompt, best sequence first."""
        from flashserve.engine.beam_search import beam_search

        if self.engine.has_unfinished_requests():
            raise RuntimeError("beam_search needs an idle engine")
        eos = self.engine.eos_token_ids
        results = []
        for prompt in _as_prompt_list(prompts):
            _, ids = self.engine.input_processor.tokenize(prompt)
            results.append(beam_search(self.engine, ids, params, eos))
        return results

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, **template_kwargs) -> list[RequestOutput]:
        """`messages` is one conversation (list of {'role','content'}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [
            {"prompt_token_ids": tok.encode(tok.apply_chat_template(c, add_generation_prompt=True, **template_kwargs),
                                            add_special_tokens=False)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        start, produced = time.perf_counter(), 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        produced += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"{produced / (time.perf_counter() - start):.1f} out tok/s")
        except BaseException:
            self.engine.abort_request([rid for rid in ids if rid not in final])
            raise
        finally:
            bar.close()
        return [final[rid] for rid in ids]


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
        return [prompts]
    return prompts


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
