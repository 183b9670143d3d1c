"""Under --policy priority the server's `priority` field orders the waiting queue (lower first)."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.server.conftest import start_server

pytestmark = pytest.mark.slow


def test_lower_priority_value_runs_first(smollm2_gguf):
    # One sequence at a time: while the first request runs, the next two wait and the policy picks.
    proc, base = start_server(smollm2_gguf, "--policy", "priority", "--max-num-seqs", "1", "--max-model-len", "256")
    try:
        async def main():
            done: list[str] = []
            async with httpx.AsyncClient(base_url=base, timeout=120) as c:
                async def one(name, priority, max_tokens):
                    r = await c.post("/v1/completions", json={
                        "model": smollm2_gguf, "prompt": f"Request {name}:", "max_tokens": max_tokens,
                        "ignore_eos": True, "priority": priority, "temperature": 0})
                    assert r.status_code == 200, r.text
                    done.append(name)

                async def until(running, waiting):
                    while True:
                        text = (await c.get("/metrics")).text
                        got = [float(re.search(rf"^flashserve_num_requests_{k} (\S+)$", text, re.M).group(1))
                               for k in ("running", "waiting")]
                        if got == [running, waiting]:
                            return
                        await asyncio.sleep(0.01)

                first = asyncio.create_task(one("first", 0, 96))
                await until(1, 0)
                late = asyncio.create_task(one("late", 10, 4))
                await until(1, 1)  # "late" waits ahead of "urgent" in arrival order
                urgent = asyncio.create_task(one("urgent", -5, 4))
                await asyncio.gather(first, late, urgent)
            return done

        t0 = time.time()
        done = asyncio.run(main())
        assert done == ["first", "urgent", "late"], (done, time.time() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
