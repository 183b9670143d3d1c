"""Handing freed heap memory back to the operating system (glibc), where start-up's temporaries
would otherwise stay in the process's resident set for its whole life. Elsewhere than glibc both
calls do nothing."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools

# mallopt's parameter numbers in glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name is not None else None
    if libc is not None and hasattr(libc, "madvise"):
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def madvise(address: int, length: int, advice: int) -> int:
    """madvise(2) on [address, address + length): 0, or the errno it failed with (ENOSYS where the
    C library has no madvise)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return errno.ENOSYS
    return 0 if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) == 0 else ctypes.get_errno()


def release_free_heap() -> None:
    """malloc_trim: hand back the free heap that freed blocks left (packing's temporaries, or the
    tokenizers library's parse of a large vocabulary, whose garbage is ~3x the tokenizer it builds)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def map_large_blocks() -> None:
    """glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB) in the heap, where
    packing's temporaries (row chunks of 25 MiB, lists of codes before a cat) left ~0.9 GiB resident
    and a 2 GiB peak for Qwen2.5-Coder-1.5B, measured; from 1 MiB up, blocks get their own mappings,
    unmapped when freed. The price: every such allocation faults its pages in anew, so only layer
    streaming, which loads layers all its life, asks for it."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def reuse_large_blocks(retained_bytes: int = 256 << 20) -> None:
    """For serving, once the weights are in place: every block comes from the heap, where a freed one
    is reused, instead of blocks above glibc's mmap threshold (at most 32 MiB) getting a fresh mapping
    at each allocation, whose page faults cost more than computing what they hold: Gemma 3's logits
    at 32 sequences are 33.5 MiB, 7 ms of faults a step against 0.7 to fill reused memory. Up to
    `retained_bytes` of free heap top stays mapped instead of going back to the system (where large
    allocators such as tcmalloc keep theirs too). Not with map_large_blocks: layer streaming wants the
    opposite."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, retained_bytes)
