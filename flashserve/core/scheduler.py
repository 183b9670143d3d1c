"""Token-budget scheduler (vLLM v1's "schedule tokens, not phases"; DeepSpeed-FastGen's
Dynamic SplitFuse): each step, running requests' tokens first (decodes, unfinished prompt
chunks), then chunks of waiting prompts fill what is left of the budget.

When blocks run out the newest running request is preempted: its blocks are freed and
it is recomputed later from its tokens (prompt + output so far), so nothing is lost; or, with a
swap space (preemption_mode "swap", or "auto" when the cost rule says so: core/swap_space.py),
its computed blocks are copied to host-memory slots and copied back into fresh blocks when it
resumes, so it continues where it stopped. The runner does a step's copies in this order:

    swap out (blocks of this step's victims → slots)   reads blocks before anyone reuses them
    copy-on-write (shared block → private block)        reads a source a victim may have left
    swap in (slots → the resumed requests' new blocks)  may overwrite blocks freed above
"static" scheduling admits a batch only when nothing runs: the baseline to beat.

Samples of one prompt (n > 1, best_of): only sample 0 computes the prompt. The others wait
aside until it has, then fork its block table (the partly filled last block included) and
start with the last prompt token left to compute, which gives them their own first logits;
writing it copies the shared block (copy-on-write in the KV cache manager). A sample that
finds no free seat (max_num_seqs) or whose parent leaves first queues as an ordinary request.

Beam search (engine/beam_search.py) runs one-token requests marked hold_blocks: when one
finishes normally its blocks stay in `held` instead of returning to the pool. A request added
with a held parent whose computed tokens its own tokens extend forks at once: it takes a
reference on every block of those tokens (the partly filled last one included) and computes
only the rest, normally the beam's one new token; its first write into the shared partial
block copies it. The driver then calls release_held on the parents. Without a free seat, or if
the tokens do not match, the request queues as an ordinary one and recomputes through the
prefix cache. Aborted requests never hold blocks, and when the pool runs short held blocks
are given back (oldest first) before anything running is preempted: a held request only saves
recomputation, while waiting for it to be released could stall every request.

    held parent, 6 tokens computed:     block 1 [0 1 2 3]   block 2 [4 5 . .]
    add parent + [x] and parent + [y]:  both tables [1, 2], refs 3; release_held(parent): refs 2
    next step, both write position 6:   the first copies block 2 into 3 and writes there,
                                        the second, now alone on block 2, writes in place

Micro-batches (pipeline parallelism keeps num_micro_batches steps in flight, one per stage):
each running request belongs to one micro-batch, and schedule() serves them in turn, taking only
that micro-batch's requests, preempting only among them, and admitting waiting requests into it
up to its even share of the requests there are. A request's next step is thus scheduled only once
its previous one's tokens are in. The steps run on every rank in the order they were scheduled,
so a block freed, reused or read from the prefix cache by a later step is written by the earlier
one first.

    2 micro-batches, 32 requests:  schedule() → batch 0 (16)  schedule() → batch 1 (16)
                                   update(batch 0's step)     schedule() → batch 0 ...

Speculative decoding (spec_decode/): after a step the engine asks spec_candidates() for the
requests that will decode next, a proposer drafts tokens for them, and set_spec_tokens() stores
them. schedule() counts a request's drafts in the token budget (one chunk of k + 1 tokens, mixed
with other requests' prefill chunks), capped so that accepting all of them plus the target's own
token never passes max_tokens or the context, and dropped rather than preempting anyone. After the
step the KV of rejected drafts is rolled back: num_computed_tokens shrinks to the accepted ones and
blocks holding only rejected positions return to the pool.

    before: L tokens, L - 1 computed; drafts d0 d1 d2 scheduled with t_{L-1} (n = 4)
    runner: accepts d0 d1, rejects d2, samples t' → tokens + [d0, d1, t']
    after:  num_computed = L - 1 + 4 - 1 = L + 1 (t_{L-1}, d0, d1); d2's slot is stale, its block freed if unused
"""
from __future__ import annotations

from dataclasses import dataclass

from flashserve.config import CacheConfig, SchedulerConfig
from flashserve.core.kv_cache_manager import KVCacheManager
from flashserve.core.policy import make_queue, preemption_victim
from flashserve.core.request import Request, RequestStatus
from flashserve.core.sched_output import RunnerOutput, ScheduledRequest, SchedulerOutput
from flashserve.core.swap_space import SwapSpace


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preempted_waiting: int
    num_preemptions_total: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_touched: int  # blocks ever handed out (never decreases)
    num_swapped_out_total: int  # preemptions that swapped the victim's KV out instead of dropping it
    swap_slots_used: int
    swap_slots_total: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    num_scheduled_tokens: int
    spec_draft_tokens_total: int  # draft tokens verified since start
    spec_accepted_tokens_total: int  # of those, accepted


class Scheduler:
    def __init__(self, sched_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 num_swap_slots: int = 0, min_tokens_per_swapped_block: float = 0.0, num_micro_batches: int = 1):
        """`num_swap_slots`: KV blocks the swap space holds; `min_tokens_per_swapped_block`: the
        cost rule of preemption_mode "auto" (core/swap_space.py); `num_micro_batches`: steps the
        engine keeps in flight, each over its own requests."""
        self.config = sched_config
        self.num_micro_batches = num_micro_batches
        self._micro_batch = 0  # the one schedule() serves next
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.swap = SwapSpace(num_swap_slots if sched_config.preemption_mode != "recompute" else 0)
        self.min_tokens_per_swapped_block = (min_tokens_per_swapped_block
                                             if sched_config.preemption_mode == "auto" else 0.0)
        self._swap_out: list[tuple[int, int]] = []  # (block, slot) of this step's victims
        self._swap_in: list[tuple[int, int]] = []  # (slot, block) of this step's resumed requests
        self.num_swapped_out_total = 0
        self.waiting = make_queue(sched_config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.fork_waiting: dict[str, list[Request]] = {}  # parent id → samples waiting for its prompt
        self.held: dict[str, Request] = {}  # finished hold_blocks requests whose blocks stay for forks
        self._finished_ids: set[str] = set()
        self._preempted_ids: set[str] = set()
        self.num_preemptions_total = 0
        self.spec_draft_tokens_total = 0
        self.spec_accepted_tokens_total = 0
        self._last_num_tokens = 0

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.check_request(req)
        if req.request_id in self.requests or req.request_id in self.held:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        parent = self.requests.get(req.parent_id)
        if parent is not None and parent.num_computed_tokens < parent.num_prompt_tokens:
            self.fork_waiting.setdefault(parent.request_id, []).append(req)
        elif not self._fork_held(req):
            self.waiting.add(req)

    def _fork_held(self, req: Request) -> bool:
        """Start `req` on the blocks of its held parent if its tokens extend the parent's computed
        ones and a seat is free; False leaves it to queue as an ordinary request."""
        parent = self.held.get(req.parent_id)
        if parent is None or len(self.running) >= self.config.max_num_seqs or req.skip_reading_prefix_cache:
            return False
        n = parent.num_computed_tokens
        if n >= req.num_tokens or req.all_token_ids[:n] != parent.all_token_ids[:n]:
            return False
        self._start_forked(parent, req, n, n)
        return True

    def _start_forked(self, parent: Request, child: Request, num_shared: int, num_computed: int) -> None:
        """The child runs on the parent's blocks of its first `num_shared` tokens, `num_computed` done."""
        self.kv_cache_manager.fork(parent, child, num_shared)
        child.micro_batch = parent.micro_batch
        child.num_computed_tokens = child.num_cached_prompt_tokens = num_computed
        child.block_ids = self.kv_cache_manager.block_ids(child.request_id)
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def release_held(self, request_ids) -> None:
        """Free the blocks of held requests; unknown or already released ids are ignored."""
        for rid in request_ids:
            req = self.held.pop(rid, None)
            if req is not None:
                self._free_blocks(req)

    def check_request(self, req: Request) -> None:
        """Raise ValueError if the request could never run (pure: reads only the configuration)."""
        max_len = self.config.max_model_len
        if req.num_prompt_tokens >= max_len:
            raise ValueError(f"the prompt has {req.num_prompt_tokens} tokens but the context is {max_len} tokens")
        max_tokens = req.sampling_params.max_tokens or max_len
        longest = min(req.num_prompt_tokens + max_tokens, max_len)
        need = -(-longest // self.block_size)
        if need > self.kv_cache_manager.num_blocks - 1:
            raise ValueError(
                f"the request may grow to {longest} tokens ({need} KV blocks) but the KV cache holds "
                f"{self.kv_cache_manager.num_blocks - 1} blocks; lower max_tokens or raise kv_cache_memory"
            )

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """Idempotent: unknown or already finished ids are ignored."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, status)

    def abort_requests(self, request_ids) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        forking = self.fork_waiting.get(req.parent_id, [])
        if req in self.running:
            self.running.remove(req)
        elif req in forking:
            forking.remove(req)
        else:
            self.waiting.remove(req)
        for child in reversed(self.fork_waiting.pop(req.request_id, [])):
            self.waiting.add_front(child)  # the parent left before its prompt was computed
        del self.requests[req.request_id]
        self.swap.release(req.request_id)  # a swapped-out request that ends while waiting
        self._finished_ids.add(req.request_id)
        ended_normally = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        if req.hold_blocks and ended_normally:
            self.held[req.request_id] = req  # its blocks stay until release_held
        else:
            self._free_blocks(req)

    def _free_blocks(self, req: Request) -> None:
        self.kv_cache_manager.free(req)
        req.block_ids = []

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """The next step: the requests of the micro-batch whose turn it is."""
        batch, self._micro_batch = self._micro_batch, (self._micro_batch + 1) % self.num_micro_batches
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        if self.config.scheduling == "static" and not self.running:
            self._admit_static_batch(batch)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.micro_batch != batch:  # another micro-batch's, maybe in flight
                i += 1
                continue
            need = req.num_tokens - req.num_computed_tokens
            probs = req.spec_token_probs
            drafts = self._take_spec_tokens(req)[: max(0, budget - need)]
            n = min(need + len(drafts), budget)
            block_ids = self._allocate(req, n)
            if block_ids is None and drafts:  # speculation never preempts anyone
                drafts, n = [], min(need, budget)
                block_ids = self._allocate(req, n)
            while block_ids is None:
                victim = preemption_victim(self.config.policy, [r for r in self.running[i:] if r.micro_batch == batch])
                self._preempt(victim)
                if victim is req:
                    break
                block_ids = self._allocate(req, n)
            if block_ids is None:
                continue  # req itself was preempted; running[i] is now the next request
            scheduled.append(self._scheduled(req, n, block_ids, drafts, probs if drafts else None))
            budget -= n
            i += 1

        if self.config.scheduling == "continuous":
            budget = self._admit_waiting(budget, scheduled, batch)
        self._last_num_tokens = self.config.max_num_batched_tokens - budget
        out = SchedulerOutput(scheduled, self._finished_ids, self._preempted_ids,
                              blocks_to_copy=self.kv_cache_manager.take_copies(),
                              blocks_to_swap_out=self._swap_out, blocks_to_swap_in=self._swap_in)
        self._finished_ids, self._preempted_ids = set(), set()
        self._swap_out, self._swap_in = [], []
        return out

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest], batch: int) -> int:
        kvm = self.kv_cache_manager
        seats = self._seats(batch)
        while len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs and seats > 0:
            req = self.waiting.peek()
            computed, num_cached = kvm.get_computed_blocks(req)
            if self.swap.slots_of(req.request_id):
                block_ids, num_cached = self._swap_in_blocks(req, computed, num_cached, budget)
            else:
                block_ids = self._allocate(req, min(req.num_tokens - num_cached, budget), computed)
            n = min(req.num_tokens - num_cached, budget)
            if block_ids is None:
                break
            self.waiting.pop()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_prompt_tokens = num_cached
            req.micro_batch = batch
            self.running.append(req)
            scheduled.append(self._scheduled(req, n, block_ids))
            budget -= n
            seats -= 1
        return budget

    def _seats(self, batch: int) -> int:
        """How many waiting requests micro-batch `batch` may take: up to its even share of the running
        and waiting requests, so that the micro-batches in flight stay alike in size."""
        if self.num_micro_batches == 1:
            return len(self.waiting)
        share = -(-(len(self.running) + len(self.waiting)) // self.num_micro_batches)
        return share - sum(1 for r in self.running if r.micro_batch == batch)

    def _swap_in_blocks(self, req: Request, computed, num_cached: int, budget: int
                        ) -> tuple[list[int] | None, int]:
        """Blocks for a swapped-out request: its prefix-cache hits, fresh blocks for the rest of its
        swapped tokens (queued to be copied in from their slots) and for this step's new tokens.
        Returns (block ids or None when the pool is short, tokens computed once the copies are done).

            swapped 10 tokens (block_size 4) in slots [3, 4, 5]; a hit on the first block:
            blocks [hit, fresh, fresh, ...]  slot 3 unused, slots 4 and 5 copied into the fresh two
        """
        slots, swapped = self.swap.slots_of(req.request_id), req.num_computed_tokens
        resumed = max(swapped, num_cached)
        n = min(req.num_tokens - resumed, budget)
        req.num_computed_tokens = 0  # allocate_slots counts from the hits: fresh blocks cover the rest
        block_ids = self._allocate(req, resumed - num_cached + n, computed)
        req.num_computed_tokens = swapped
        if block_ids is None:
            return None, swapped
        first = len(computed)  # the blocks before it came from the prefix cache
        self._swap_in += [(slot, block_ids[j]) for j, slot in enumerate(slots) if j >= first]
        self.swap.release(req.request_id)
        return block_ids, resumed

    def _allocate(self, req: Request, n: int, computed=()) -> list[int] | None:
        """allocate_slots, giving back held blocks (oldest first) while the pool is short."""
        block_ids = self.kv_cache_manager.allocate_slots(req, n, computed)
        while block_ids is None and self.held:
            self.release_held([next(iter(self.held))])
            block_ids = self.kv_cache_manager.allocate_slots(req, n, computed)
        return block_ids

    def _admit_static_batch(self, batch: int) -> None:
        """Take waiting requests while their whole prompts (and one decode slot) fit the free pool.
        The batch is one micro-batch: static batching runs one step at a time."""
        free = self.kv_cache_manager.num_free_blocks
        while len(self.waiting) and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.peek()
            need = -(-(req.num_tokens + 1) // self.block_size)
            if need > free:
                break
            free -= need
            self.waiting.pop()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = 0  # static batches recompute: any swapped blocks are dropped
            req.micro_batch = batch
            self.swap.release(req.request_id)
            self.running.append(req)

    def _take_spec_tokens(self, req: Request) -> list[int]:
        """The request's drafts for this step (cleared on the request): none unless it is decoding,
        and at most as many as leave room for the target's own token within max_tokens and the context."""
        drafts, req.spec_token_ids, req.spec_token_probs = req.spec_token_ids, [], None
        if not drafts or req.num_tokens - req.num_computed_tokens != 1:
            return []
        return drafts[: self._spec_room(req)]

    def _spec_room(self, req: Request) -> int:
        room = self.config.max_model_len - req.num_tokens
        if req.sampling_params.max_tokens is not None:
            room = min(room, req.sampling_params.max_tokens - req.num_output_tokens)
        return max(room - 1, 0)

    def spec_candidates(self) -> list[Request]:
        """Running requests that decode next step and may take drafts. Guided decoding is left out
        (its grammar matcher follows accepted tokens only), and so is a request with no room left."""
        return [r for r in self.running
                if r.num_tokens - r.num_computed_tokens == 1 and r.sampling_params.guided_decoding is None
                and self._spec_room(r) > 0]

    def set_spec_tokens(self, drafts: dict[str, list[int]], probs: dict | None = None) -> None:
        """Store proposed drafts for the next schedule(); unknown or finished ids are ignored.
        `probs`: the proposal distribution of sampled drafts by request id (passed on to the
        rejection sampler untouched; drafts without one were chosen deterministically)."""
        probs = probs or {}
        for rid, tokens in drafts.items():
            req = self.requests.get(rid)
            if req is not None and req.status is RequestStatus.RUNNING:
                req.spec_token_ids = list(tokens)
                req.spec_token_probs = probs.get(rid)

    def _preempt(self, req: Request) -> None:
        req.spec_token_ids, req.spec_token_probs = [], None
        self.running.remove(req)
        if not self._swap_out_blocks(req):
            req.num_computed_tokens = 0
        self._free_blocks(req)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self._preempted_ids.add(req.request_id)
        self.waiting.add_front(req)

    def _swap_out_blocks(self, req: Request) -> bool:
        """Queue the copies of the blocks holding the victim's computed tokens into swap slots; False
        (recompute) when the slots are short or the cost rule finds recomputing cheaper."""
        blocks = self.kv_cache_manager.block_ids(req.request_id)[: -(-req.num_computed_tokens // self.block_size)]
        if not blocks or req.num_computed_tokens < self.min_tokens_per_swapped_block * len(blocks):
            return False
        slots = self.swap.allocate(req.request_id, len(blocks))
        if slots is None:
            return False
        self._swap_out += list(zip(blocks, slots))
        self.num_swapped_out_total += 1
        return True

    def _scheduled(self, req: Request, n: int, block_ids: list[int], drafts: list[int] = (),
                   probs=None) -> ScheduledRequest:
        req.block_ids = block_ids
        return ScheduledRequest(req.request_id, req.all_token_ids, req.num_computed_tokens, n, block_ids,
                                req.sampling_params, req.output_token_ids, list(drafts), probs)

    # ---- results -------------------------------------------------------------------------
    def update_from_output(self, sched_out: SchedulerOutput, runner_out: RunnerOutput) -> list[Request]:
        """Advance progress, append sampled tokens, finish what stops. Returns the requests that changed."""
        changed = []
        for sr, tokens in zip(sched_out.scheduled, runner_out.sampled_token_ids):
            req = self.requests.get(sr.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted or preempted since it was scheduled
            req.num_computed_tokens += sr.num_scheduled_tokens
            if sr.spec_token_ids:
                self._roll_back_rejected(req, len(sr.spec_token_ids), len(tokens) - 1)
            if req.request_id in self.fork_waiting and req.num_computed_tokens >= req.num_prompt_tokens:
                self._fork_samples(req)
            for token in tokens:
                req.append_output_token(token)
                status = self._stop_status(req, token)
                if status is not None:
                    self._finish(req, status)
                    break
            if tokens:
                changed.append(req)
        return changed

    def _roll_back_rejected(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        """The KV of the rejected drafts is not the request's: forget it and free unused blocks."""
        req.num_computed_tokens -= num_drafts - num_accepted
        req.block_ids = self.kv_cache_manager.trim(req, req.num_computed_tokens)
        req.num_draft_tokens += num_drafts
        req.num_accepted_tokens += num_accepted
        self.spec_draft_tokens_total += num_drafts
        self.spec_accepted_tokens_total += num_accepted

    def _fork_samples(self, parent: Request) -> None:
        """The parent's prompt is in the cache: its waiting samples share those blocks and
        start with only the last prompt token to compute (for their own first logits)."""
        n = parent.num_prompt_tokens
        children = self.fork_waiting.pop(parent.request_id)
        seats = max(0, self.config.max_num_seqs - len(self.running))
        for child in reversed(children[seats:]):
            self.waiting.add_front(child)  # no seat: run later on its own, through the prefix cache
        for child in children[:seats]:
            self._start_forked(parent, child, n, n - 1)

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling_params
        may_stop = req.num_output_tokens >= sp.min_tokens
        if may_stop and token in sp.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if may_stop and not sp.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if sp.max_tokens is not None and req.num_output_tokens >= sp.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def check_invariants(self) -> None:
        """Block ref counts equal the holders among unfinished and held requests (for tests)."""
        self.kv_cache_manager.check_invariants([*self.requests.values(), *self.held.values()])

    def get_stats(self) -> SchedulerStats:
        kvm = self.kv_cache_manager
        used = kvm.num_blocks - 1 - kvm.num_free_blocks
        q, h = kvm.prefix_queries, kvm.prefix_hits
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting) + sum(len(c) for c in self.fork_waiting.values()),
            num_preempted_waiting=sum(1 for r in self.waiting if r.status is RequestStatus.PREEMPTED),
            num_preemptions_total=self.num_preemptions_total,
            kv_blocks_used=used,
            kv_blocks_total=kvm.num_blocks - 1,
            kv_blocks_touched=kvm.pool.num_touched,
            num_swapped_out_total=self.num_swapped_out_total,
            swap_slots_used=self.swap.num_slots - self.swap.num_free,
            swap_slots_total=self.swap.num_slots,
            kv_usage=kvm.usage,
            prefix_cache_queries=q,
            prefix_cache_hits=h,
            prefix_cache_hit_rate=h / q if q else 0.0,
            num_scheduled_tokens=self._last_num_tokens,
            spec_draft_tokens_total=self.spec_draft_tokens_total,
            spec_accepted_tokens_total=self.spec_accepted_tokens_total,
        )
