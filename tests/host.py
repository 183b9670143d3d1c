"""This host's CPU flags, read straight from /proc/cpuinfo: the tests' own reading, independent of
flashserve/cpu_info.py, which they check."""
from __future__ import annotations


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).partition(":")[2].split())
