"""The OpenAI-compatible server over real HTTP with the official client."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from flashserve import SamplingParams

pytestmark = pytest.mark.slow


def client(base, key="none"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_and_health(server):
    base, model = server
    ids = [m.id for m in client(base).models.list().data]
    assert model in ids
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}


def offline(llm, prompt, **params):
    """The same engine configuration through LLM.generate: the answer the server must give."""
    return llm.generate([prompt], SamplingParams(temperature=0, **params), use_tqdm=False)[0]


def as_openai_top(entry: dict) -> dict:
    """An offline {token_id: Logprob} entry as the completions API's {token text: logprob}."""
    return {lp.decoded_token: lp.logprob for lp in entry.values()}


def assert_close_tops(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and all(abs(got[t] - want[t]) < 1e-5 for t in want), (got, want)


def test_greedy_completion_equals_offline(server, smollm2_default_llm):
    base, model = server
    prompt = "The three primary colors are"
    r = client(base).completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    want = offline(smollm2_default_llm, prompt, max_tokens=12)
    assert r.choices[0].text == want.outputs[0].text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"


def test_streamed_text_equals_non_streamed_for_the_same_seed(server):
    base, model = server
    c = client(base)
    kw = dict(model=model, prompt="Write a short poem about the sea:", max_tokens=24, temperature=0.9, seed=11)
    full = c.completions.create(**kw).choices[0].text
    parts, finish = [], None
    for chunk in c.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        else:
            assert chunk.usage.completion_tokens == 24
    assert "".join(parts) == full and finish == "length"


def test_chat_plain_and_streamed(server, smollm2_default_llm):
    base, model = server
    c = client(base)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
    text = r.choices[0].message.content
    want = smollm2_default_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert r.choices[0].message.role == "assistant" and text == want.outputs[0].text and "Paris" in text
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=model, messages=msgs, max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == text


def test_n_samples_and_stop_strings(server):
    base, model = server
    c = client(base)
    r = c.completions.create(model=model, prompt="List: apples, pears,", max_tokens=16, n=2, temperature=1.0, seed=3)
    assert sorted(ch.index for ch in r.choices) == [0, 1]
    full = c.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0).choices[0].text
    stop = full.strip()[3:6]  # a piece from the middle, likely spanning tokens
    cut = c.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_samples_end_once_each(server):
    """n=3 samples that stop at different points (a stop string at temperature 1): each index has
    one chunk with a finish reason, and nothing after it, on completions and on chat."""
    base, model = server
    c = client(base)
    kw = dict(model=model, max_tokens=40, n=3, temperature=1.0, seed=5, stop=["."], stream=True)
    for stream in (c.completions.create(prompt="Tell me about cats", **kw),
                   c.chat.completions.create(messages=[{"role": "user", "content": "Tell me about cats"}], **kw)):
        ends, after_end, lengths = {}, [], {}
        for chunk in stream:
            for ch in chunk.choices:
                if ends.get(ch.index):
                    after_end.append(ch)
                ends[ch.index] = ends.get(ch.index, 0) + (ch.finish_reason is not None)
                text = ch.text if hasattr(ch, "text") else ch.delta.content
                lengths[ch.index] = lengths.get(ch.index, 0) + len(text or "")
        assert ends == {0: 1, 1: 1, 2: 1} and not after_end, (ends, after_end)
        assert len(set(lengths.values())) > 1, lengths  # the samples did stop at different points


def test_logprobs_equal_offline(server, smollm2_default_llm):
    base, model = server
    prompt = "Once upon a time"
    r = client(base).completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(3 <= len(t) <= 4 for t in lp.top_logprobs)
    want = offline(smollm2_default_llm, prompt, max_tokens=4, logprobs=3).outputs[0]
    for i, (tok_id, entry) in enumerate(zip(want.token_ids, want.logprobs)):
        assert abs(lp.token_logprobs[i] - entry[tok_id].logprob) < 1e-5
        assert_close_tops(lp.top_logprobs[i], as_openai_top(entry))
    assert lp.token_logprobs[0] == max(lp.top_logprobs[0].values())  # greedy took the most likely
    chat = client(base).chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_echo_with_logprobs_scores_the_prompt(server, smollm2_default_llm):
    base, model = server
    prompt = "The quick brown fox jumps over"
    want = offline(smollm2_default_llm, prompt, max_tokens=3, logprobs=2, prompt_logprobs=2)
    ids = want.prompt_token_ids
    n = len(ids)
    kw = dict(model=model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    r = client(base).completions.create(**kw)
    ch = r.choices[0]
    lp = ch.logprobs
    assert ch.text.startswith(prompt) and len(lp.tokens) == n + 3 and "".join(lp.tokens) == ch.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n + 3)]
    for p in range(1, n):  # each prompt token scored as the offline engine scores it, with its top 2
        assert abs(lp.token_logprobs[p] - want.prompt_logprobs[p][ids[p]].logprob) < 1e-5
        assert_close_tops(lp.top_logprobs[p], as_openai_top(want.prompt_logprobs[p]))
        assert 2 <= len(lp.top_logprobs[p]) <= 3
    first = want.outputs[0]  # the first generated token (greedy) and its top 2
    assert abs(lp.token_logprobs[n] - first.logprobs[0][first.token_ids[0]].logprob) < 1e-5
    assert_close_tops(lp.top_logprobs[n], as_openai_top(first.logprobs[0]))
    streamed = [c.choices[0] for c in client(base).completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in streamed) == ch.text
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.tokens]
    values = [v for c in streamed if c.logprobs for v in c.logprobs.token_logprobs]
    offsets = [o for c in streamed if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    assert values[0] is None and all(abs(a - b) < 1e-6 for a, b in zip(values[1:], lp.token_logprobs[1:]))
    plain = client(base).completions.create(**{**kw, "logprobs": None})
    assert plain.choices[0].text == ch.text and plain.choices[0].logprobs is None


def test_best_of_returns_the_most_likely_of_its_candidates(server):
    base, model = server
    c = client(base)
    kw = dict(model=model, prompt="Name a fruit:", max_tokens=6, temperature=1.0, seed=21)
    every = c.completions.create(n=3, logprobs=0, **kw).choices
    cum = [sum(ch.logprobs.token_logprobs) for ch in every]
    best = c.completions.create(n=1, best_of=3, **kw).choices
    assert len(best) == 1 and best[0].text == every[cum.index(max(cum))].text and best[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        c.completions.create(n=1, best_of=3, stream=True, **kw)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(**{**kw, "temperature": 0}, best_of=2)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(n=3, best_of=2, **kw)


def test_32_concurrent_streaming_clients_all_finish(server):
    base, model = server
    prompts = [f"Fact number {i} about the moon:" for i in range(32)]
    single = client(base)
    want = [single.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
            for p in prompts[:4]]

    async def one(ac, p):
        text, finish = "", None
        stream = await ac.completions.create(model=model, prompt=p, max_tokens=8, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        async for ch in stream:
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        return text, finish

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(ac, p) for p in prompts))

    results = asyncio.run(main())
    assert all(f == "length" for _, f in results)
    assert [t for t, _ in results[:4]] == want  # batching does not change greedy outputs


def metric(base, name) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(f"{base}/metrics").text, re.M)
    return float(m.group(1))


def test_client_disconnect_aborts_and_frees_blocks(server):
    base, model = server
    body = {"model": model, "prompt": "Tell me a very long story.", "max_tokens": 800, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    deadline = time.time() + 30
    while time.time() < deadline:
        if metric(base, "flashserve_kv_cache_blocks_used") == 0 and metric(base, "flashserve_num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert metric(base, "flashserve_kv_cache_blocks_used") == 0
    text = httpx.get(f"{base}/metrics").text
    assert 'flashserve_requests_total{outcome="abort"}' in text
    assert "flashserve_time_to_first_token_seconds_bucket" in text


def test_metrics_report_reserved_and_touched_kv_bytes(server):
    """Reserved: the pool the server starts with; touched: blocks ever handed out, in bytes."""
    from flashserve.model.loader import load_model_config

    base, model = server
    r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
    mc = load_model_config(model)
    per_block = 2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim * 2  # K and V, 16 tokens, float16 (default)
    reserved = metric(base, "flashserve_kv_cache_reserved_bytes")
    touched = metric(base, "flashserve_kv_cache_touched_bytes")
    assert reserved % per_block == 0 and reserved <= (32 * 1024 // 16 + 1) * per_block  # 32 contexts of 1024
    assert 0 < touched < reserved and touched % per_block == 0


BAD = [
    ("malformed json", b"{not json", 400),
    ("wrong type", {"prompt": "x", "max_tokens": "many"}, 400),
    ("unknown field", {"prompt": "x", "frobnicate": 1}, 400),
    ("unknown model", {"prompt": "x", "model": "gpt-17"}, 400),
    ("empty prompt", {"prompt": ""}, 400),
    ("max_tokens beyond context", {"prompt": "x", "max_tokens": 5000}, 400),
    ("oversized n", {"prompt": "x", "n": 1000}, 400),
    ("negative temperature", {"prompt": "x", "temperature": -1}, 400),
    ("prompt longer than context", {"prompt": [5] * 2000}, 400),
]


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, name, body, status):
    base, model = server
    if isinstance(body, dict):
        body = json.dumps({"model": model, **body}).encode()
    r = httpx.post(f"{base}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_server_still_answers_after_a_barrage(server):
    base, model = server
    for _, body, _ in BAD * 3:
        httpx.post(f"{base}/v1/completions", content=json.dumps({"model": model, **body}).encode()
                   if isinstance(body, dict) else body, headers={"content-type": "application/json"})
    r = client(base).completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_api_key_and_bounded_queue(guarded_server):
    base, model = guarded_server
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong").models.list()
    assert client(base, "sekrit").models.list().data

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="sekrit", max_retries=0, timeout=300)

        async def one(i):
            try:
                await ac.completions.create(model=model, prompt=f"Item {i}", max_tokens=16,
                                           extra_body={"ignore_eos": True})
                return "ok"
            except openai.RateLimitError:
                return "429"
        return await asyncio.gather(*(one(i) for i in range(8)))

    outcomes = asyncio.run(main())
    assert "429" in outcomes and "ok" in outcomes


def test_swap_preemption_over_http_keeps_greedy_tokens_and_frees_its_slots(server, smollm2_gguf):
    """A server whose KV pool holds 8 blocks (128 tokens) gets 4 requests of ~60 tokens at once: some
    are preempted with their blocks copied to swap space and back. Each answer equals the roomy
    server's, the swap counters say it happened, and every slot is free after."""
    from tests.server.conftest import serving

    base, model = server
    block_bytes = 2 * 30 * 16 * 3 * 64 * 2  # SmolLM2: K and V, 30 layers, 16 tokens, 3 KV heads x 64, float16
    prompts = [f"Count from {i} to {i + 40}, one number a line:" for i in range(4)]
    body = {"model": model, "max_tokens": 40, "temperature": 0, "ignore_eos": True}

    def answers(url) -> list[str]:
        async def run():
            async with httpx.AsyncClient(timeout=300) as c:
                rs = await asyncio.gather(*(c.post(f"{url}/v1/completions", json={**body, "prompt": p})
                                            for p in prompts))
            return [r.json()["choices"][0]["text"] for r in rs]
        return asyncio.run(run())

    want = answers(base)
    with serving(smollm2_gguf, "--kv-cache-memory", str(8 * block_bytes), "--swap-space", str(8 * block_bytes),
                 "--preemption-mode", "swap", "--max-num-seqs", "4") as (tight, _):
        assert answers(tight) == want
        assert metric(tight, "flashserve_num_swapped_out") > 0
        assert metric(tight, "flashserve_swap_slots_total") == 8
        assert metric(tight, "flashserve_swap_slots_used") == 0
        assert metric(tight, "flashserve_kv_cache_blocks_used") == 0
