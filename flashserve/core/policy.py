"""Waiting-queue orderings: first come first served, or by priority (lower value first)."""
from __future__ import annotations

import bisect
import itertools
from collections import deque

from flashserve.core.request import Request


class FCFSQueue:
    def __init__(self):
        self._q: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self._q.append(req)

    def add_front(self, req: Request) -> None:
        """Preempted requests resume before newer ones."""
        self._q.appendleft(req)

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, req: Request) -> None:
        self._q.remove(req)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self):
        return iter(self._q)


class PriorityQueue:
    """Sorted by (priority, arrival); a preempted request keeps its place by the same key."""

    def __init__(self):
        self._items: list[tuple[int, float, int, Request]] = []
        self._tie = itertools.count()

    def add(self, req: Request) -> None:
        bisect.insort(self._items, (req.priority, req.arrival_time, next(self._tie), req), key=lambda t: t[:3])

    add_front = add

    def peek(self) -> Request:
        return self._items[0][3]

    def pop(self) -> Request:
        return self._items.pop(0)[3]

    def remove(self, req: Request) -> None:
        self._items = [t for t in self._items if t[3] is not req]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return (t[3] for t in self._items)


def make_queue(policy: str):
    return PriorityQueue() if policy == "priority" else FCFSQueue()


def preemption_victim(policy: str, candidates: list[Request]) -> Request:
    """Whom to evict when blocks run out: the newest (FCFS) or the least urgent (priority)."""
    if policy == "priority":
        return max(candidates, key=lambda r: (r.priority, r.arrival_time))
    return candidates[-1]
