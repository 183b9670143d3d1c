"""A memory cgroup for one benchmark child: the kernel holds the child's memory, page cache included,
under a limit (reclaiming the cache, or killing the child when its own memory does not fit, there
being no swap), as on a machine with that much RAM. cgroup v2 (memory.max) or v1 (the memory
controller's limit_in_bytes); needs root. A fresh group per run, so that its peak is that run's.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class MemoryCgroup:
    def __init__(self, limit_bytes: int):
        v2 = (ROOT / "cgroup.controllers").exists()
        self.v2 = v2
        self.path = (ROOT if v2 else ROOT / "memory") / f"flashserve-bench-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self._write("memory.max" if v2 else "memory.limit_in_bytes", str(limit_bytes))

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def enter(self) -> None:
        """Move the calling process into the group (a child's preexec_fn, before it execs)."""
        self._write("cgroup.procs", str(os.getpid()))

    def peak_bytes(self) -> int:
        """The most the group held at once: the child's memory and the page cache charged to it."""
        return int((self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")).read_text())

    def oom_killed(self) -> bool:
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value) > 0:
                return True
        return False

    def remove(self) -> None:
        self.path.rmdir()


def drop_page_cache(*paths: str) -> None:
    """Forget these files' cached pages, so a run reads them from the device (pages cached by an
    earlier run would otherwise be free to a later one: they stay charged to the group that read them)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
