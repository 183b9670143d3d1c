"""AsyncLLMEngine: one thread drives LLMEngine.step() back to back; each request streams from its own queue.

The step thread alone touches engine state: new requests are validated at once on the event loop
(tokenizing is safe beside a running step) and handed over with aborts through a locked inbox,
applied between steps. Outputs go back to the event loop by call_soon_threadsafe and the thread
starts the next step at once: the loop's HTTP work (SSE chunks, JSON) runs beside the step,
not between two steps. The steps run on the thread that built the engine when the caller
gives it (run_server does): OpenMP (libgomp) gives each thread that enters a parallel region a
team of workers that stays, and with two teams there are more OpenMP threads than cores on a
small machine, so libgomp lets a waiting worker spin only briefly before it sleeps: every
parallel region of a step then began with waking it (a SmolLM2 stream took ~15 ms a token
through the server, ~8 ms offline). Only the event loop touches the streams. If a step
fails, the requests in flight get the error and the thread goes on with everyone else; if the
model's worker processes failed (WorkerError), the engine is dead: the thread ends, every request
in flight gets the error, new ones get EngineDeadError (HTTP 503) and `on_dead` is called.
HTTP handlers read `stats`, a snapshot the thread takes between steps, never the scheduler
itself (its queues change under a running step).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from flashserve.engine.llm_engine import LLMEngine, PreparedRequest
from flashserve.errors import FlashserveError, WorkerError
from flashserve.outputs import RequestOutput

logger = logging.getLogger(__name__)


class QueueFullError(FlashserveError):
    """The bounded waiting queue is full: try again later (HTTP 429)."""


class EngineStepError(FlashserveError):
    pass


class EngineDeadError(FlashserveError):
    """The model's workers have stopped: no request can run any more (HTTP 503)."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, engine_thread: ThreadPoolExecutor | None = None):
        """engine_thread: the one-thread pool that built `engine`, to run its steps on too (see
        run_server); without it the steps get a thread of their own."""
        self.engine = engine
        self._engine_thread = engine_thread
        self.max_waiting = max_waiting
        self._streams: dict[str, asyncio.Queue] = {}  # the event loop's alone
        # handed from the event loop to the step thread under _pending
        self._inbox: list[PreparedRequest] = []
        self._aborts: list[str] = []
        self._sample_ends: list[tuple[str, int]] = []  # (request id, sample index): end_sample()
        self._releases: list[str] = []  # held requests whose blocks go: release_held()
        self._uncounted: set[str] = set()  # beam search's steps: no finished request of their own
        self._pending = threading.Condition()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future | None = None  # the step thread's loop, once started
        self.on_finished = None  # optional callback(RequestOutput) for metrics
        self._ended: set[str] = set()  # requests the caller ended (end()), not left
        # optional callback(outcome) when a request stops before it finished: "abort" when its
        # client went away, "ended" when the caller ended it (end())
        self.on_aborted = None
        self.on_dead = None  # optional callback() once the engine's workers have failed
        self.dead: WorkerError | None = None
        self.stats = engine.get_stats()  # EngineStats as of the last step or applied add/abort

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        pool = self._engine_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashserve-step")
        self._done = asyncio.wrap_future(pool.submit(self._run))

    async def stop(self) -> None:
        with self._pending:
            self._stopping = True
            self._pending.notify()
        if self._done is not None:
            await self._done

    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting + len(self._inbox)

    async def generate(self, prompt, params, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields the request's output each time it changes; the last one has finished=True.
        Closing the iterator early (client gone) aborts the request and frees its blocks."""
        rid = request_id or uuid.uuid4().hex
        self.check_room()
        prep = self.engine.prepare_request(rid, prompt, params, priority)
        queue = self._submit(prep)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                outcome = "abort"
                if rid in self._ended:
                    self._ended.discard(rid)
                    outcome = "ended"
                self.abort(rid)
                if self.on_aborted:
                    self.on_aborted(outcome)

    def check_room(self) -> None:
        """EngineDeadError or QueueFullError if a new request cannot be taken now."""
        if self.dead is not None:
            raise EngineDeadError(str(self.dead))
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"the server has {self.max_waiting} requests waiting; try again later")

    def _submit(self, prep: PreparedRequest) -> asyncio.Queue:
        """Hand a prepared request to the step thread; its outputs come on the returned queue."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[prep.request_id] = queue
        with self._pending:
            self._inbox.append(prep)
            self._pending.notify()
        return queue

    async def run_round(self, preps: list[PreparedRequest], release: list[str]) -> list[RequestOutput]:
        """Beam search's round (beam_search_async): run prepared requests to their end, together, and
        return their final outputs in order. `release`: held requests (the previous round) whose
        blocks are freed once these, which fork them, are added. Unfinished ones are aborted if this
        is cancelled. Their outputs are not counted as finished requests (on_finished)."""
        queues = [self._submit(prep) for prep in preps]
        self._uncounted.update(prep.request_id for prep in preps)
        self.release_held(release)  # queued after the adds: the step thread applies it after them
        finals: list[RequestOutput] = []
        try:
            for queue in queues:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item.finished:
                        finals.append(item)
                        break
            return finals
        finally:
            for prep in preps[len(finals):]:
                self.abort(prep.request_id)
            self._uncounted.difference_update(prep.request_id for prep in preps)

    def release_held(self, request_ids: list[str]) -> None:
        """Free the blocks of finished hold_blocks requests (LLMEngine.release_held), between steps."""
        if request_ids:
            with self._pending:
                self._releases += request_ids
                self._pending.notify()

    def end(self, request_id: str) -> None:
        """The caller has what it wants of a request the model has not finished (a tool call under
        parallel_tool_calls=false). The caller then closes its stream, which aborts the request (its
        tokens stop, its KV blocks are freed), counted as ended rather than as a client gone."""
        self._ended.add(request_id)

    def end_sample(self, request_id: str, index: int) -> None:
        """As end(), for one sample of an n > 1 request while the others go on: its tokens stop and
        its blocks are freed between steps; the stream goes on with the other samples (the ended
        one's finish reason is "ended": the caller keeps what it had of it)."""
        with self._pending:
            self._sample_ends.append((request_id, index))
            self._pending.notify()

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        with self._pending:
            self._aborts.append(request_id)
            self._pending.notify()

    # --- the step thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._pending:
                while not (self._stopping or self._inbox or self._aborts or self._sample_ends or self._releases
                           or self.engine.has_unfinished_requests()):
                    self._pending.wait()
                if self._stopping:
                    return
                # Adds before aborts: an abort that came with (or after) its request's add finds it.
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                sample_ends, self._sample_ends = self._sample_ends, []
                releases, self._releases = self._releases, []
            self._apply(inbox, aborts, sample_ends, releases)
            if not self.engine.has_unfinished_requests():
                self.stats = self.engine.get_stats()
                continue
            try:
                outputs = self.engine.step()
            except WorkerError as exc:
                logger.error("the model's workers failed; the engine stops: %s", exc)
                self.dead = exc  # before the streams hear of it: a new request then sees a dead engine
                self._loop.call_soon_threadsafe(self._die, exc)
                return
            except Exception as exc:  # a bug must not take the server down with it
                logger.exception("engine step failed; failing the requests in flight")
                failed = asyncio.run_coroutine_threadsafe(
                    self._fail_all(EngineStepError(f"internal error during generation: {exc}")), self._loop)
                self.engine.abort_request(failed.result())
                outputs = []
            self.stats = self.engine.get_stats()
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _apply(self, inbox: list[PreparedRequest], aborts: list[str], sample_ends: list[tuple[str, int]],
               releases: list[str]) -> None:
        """Adds first, then aborts, ended samples and released blocks (which the adds may fork)."""
        for prep in inbox:
            try:
                self.engine.add_prepared(prep)
            except Exception as exc:
                self._loop.call_soon_threadsafe(self._fail_one, prep.request_id, exc)
        if aborts:
            self.engine.abort_request(aborts)
        outputs = [out for rid, index in sample_ends for out in self.engine.end_sample(rid, index)]
        if outputs:
            self._loop.call_soon_threadsafe(self._deliver, outputs)
        if releases:
            self.engine.release_held(releases)
        if inbox or aborts or sample_ends or releases:
            self.stats = self.engine.get_stats()

    # --- on the event loop ------------------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
                if self.on_finished and out.request_id not in self._uncounted:
                    self.on_finished(out)
            if queue is not None:
                queue.put_nowait(out)

    def _fail_one(self, request_id: str, exc: Exception) -> None:
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(exc)

    def _fail_streams(self, exc: Exception) -> list[str]:
        """Every stream gets `exc` and is closed; returns their ids."""
        streams, self._streams = self._streams, {}
        for queue in streams.values():
            queue.put_nowait(exc)
        return list(streams)

    async def _fail_all(self, exc: Exception) -> list[str]:
        return self._fail_streams(exc)  # the ids, for the step thread to abort

    def _die(self, exc: WorkerError) -> None:
        self._fail_streams(exc)
        if self.on_dead:
            self.on_dead()
