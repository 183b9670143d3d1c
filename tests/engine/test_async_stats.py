"""AsyncLLMEngine: stats come from a snapshot taken between steps, never from the scheduler during a step."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from flashserve.engine.async_engine import AsyncLLMEngine


class FakeEngine:
    """Counts requests down one token per step; get_stats fails if called while a step runs."""

    def __init__(self):
        self.left: dict[str, int] = {}
        self.stepping = threading.Event()
        self.stats_during_step = 0

    def get_stats(self):
        if self.stepping.is_set():
            self.stats_during_step += 1
        return SimpleNamespace(num_waiting=0, num_running=len(self.left))

    def prepare_request(self, rid, prompt, params, priority=0):
        return SimpleNamespace(request_id=rid, n=params)

    def add_prepared(self, prep):
        self.left[prep.request_id] = prep.n

    def abort_request(self, ids):
        for rid in [ids] if isinstance(ids, str) else ids:
            self.left.pop(rid, None)

    def has_unfinished_requests(self):
        return bool(self.left)

    def step(self):
        self.stepping.set()
        time.sleep(0.01)
        outs = []
        for rid in list(self.left):
            self.left[rid] -= 1
            done = self.left[rid] == 0
            if done:
                del self.left[rid]
            outs.append(SimpleNamespace(request_id=rid, finished=done))
        self.stepping.clear()
        return outs


def test_handlers_read_a_snapshot_while_steps_run():
    fake = FakeEngine()

    async def main():
        eng = AsyncLLMEngine(fake, max_waiting=100)
        eng.start()

        async def consume(i):
            return [o async for o in eng.generate("p", 5, request_id=str(i))]

        async def poll():
            seen = []
            while fake.left or not seen:
                seen.append((eng.num_waiting, eng.stats.num_running))
                await asyncio.sleep(0.001)
            return seen

        *outs, seen = await asyncio.gather(*(consume(i) for i in range(4)), poll())
        assert all(len(o) == 5 and o[-1].finished for o in outs)
        assert any(running == 4 for _, running in seen)
        await asyncio.sleep(0.05)
        assert eng.stats.num_running == 0
        await eng.stop()

    asyncio.run(main())
    assert fake.stats_during_step == 0


def test_an_abort_shows_in_the_snapshot_without_another_step():
    fake = FakeEngine()

    async def main():
        eng = AsyncLLMEngine(fake)
        eng.start()
        gen = eng.generate("p", 10_000)
        await gen.__anext__()
        await gen.aclose()  # the client went away
        for _ in range(100):
            if eng.stats.num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert eng.stats.num_running == 0 and not fake.left
        await eng.stop()

    asyncio.run(main())


def test_steps_run_on_the_thread_that_built_the_engine():
    """run_server builds the engine on a one-thread pool and steps it there (one OpenMP team per
    process); the event loop's thread never steps."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    built_on = pool.submit(threading.get_ident).result()
    stepped_on = set()

    class Recording(FakeEngine):
        def step(self):
            stepped_on.add(threading.get_ident())
            return super().step()

    async def main():
        eng = AsyncLLMEngine(Recording(), engine_thread=pool)
        eng.start()
        outs = [o async for o in eng.generate("p", 3)]
        await eng.stop()
        return outs

    outs = asyncio.run(main())
    assert [o.finished for o in outs] == [False, False, True]
    assert stepped_on == {built_on} and threading.get_ident() not in stepped_on
    pool.shutdown()
