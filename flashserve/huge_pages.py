"""Weights in transparent huge pages: a decode step streams every weight byte once a token, and in
4 KiB pages that is a TLB entry (and, beyond the TLB's reach, a page walk) for every 64 cache
lines. Linux can back anonymous memory with 2 MiB pages, in two ways used here one after the other:

- born huge (`allocations_in_huge_pages`, around the loader): the C++ kernels' allocator gives each
  large block a 2 MiB-aligned mapping advised MADV_HUGEPAGE before its first write, so the pages
  fault in 2 MiB at a time; that is also cheaper than faulting small pages. It needs the kernels.
- collapsed (`collapse_weights`, once the rank's weights are final): madvise(MADV_COLLAPSE) (Linux
  6.1) turns the small pages still under a span into a huge page in place, whatever the system's THP
  setting: the tails of large blocks, small weights packed together in the heap, or every weight
  where the kernels are missing. It copies each span into a fresh huge page, seconds for a model of
  a GiB on a VM when nothing was born huge (in a thread beside decode steps it slowed them more
  than it gained); a span already huge costs nothing. A span may also hold other data of the
  process (the heap mixes them), which is harmless. Where the kernel refuses (older kernels, no
  memory to compact, a span crossing a mapping's end) the pages stay as they are: only the mapping
  changes, never a value.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import mmap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from flashserve.heap import madvise

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1
MIN_COVER = 0.5  # of a span's bytes weights, for it to be collapsed


def weight_spans(model: nn.Module, min_cover: float = MIN_COVER) -> list[int]:
    """Start addresses of the 2 MiB-aligned spans whose bytes are at least `min_cover` parameter
    bytes of the model (on the CPU), sorted. The rest of a span is other memory of the process,
    which collapsing makes resident if it was not: free heap, for one."""
    cover: dict[int, int] = {}
    for p in dict.fromkeys(model.parameters()):
        if p.device.type != "cpu" or p.nbytes == 0:
            continue
        start, end = p.data_ptr(), p.data_ptr() + p.nbytes
        for span in range(start // HUGE_PAGE, (end - 1) // HUGE_PAGE + 1):
            low, high = max(start, span * HUGE_PAGE), min(end, (span + 1) * HUGE_PAGE)
            cover[span] = cover.get(span, 0) + high - low
    return sorted(span * HUGE_PAGE for span, covered in cover.items() if covered >= min_cover * HUGE_PAGE)


def aligned_spans(address: int, nbytes: int) -> list[int]:
    """Start addresses of the 2 MiB-aligned spans wholly inside [address, address + nbytes)."""
    first = -(-address // HUGE_PAGE) * HUGE_PAGE
    return list(range(first, address + nbytes - HUGE_PAGE + 1, HUGE_PAGE))


def collapse_spans(spans: list[int]) -> int:
    """madvise(MADV_COLLAPSE) on each 2 MiB span; returns the bytes the kernel mapped with huge
    pages (0 where it cannot: not Linux, a kernel before 6.1)."""
    done, reasons = 0, set()
    for start in spans:
        err = madvise(start, HUGE_PAGE, MADV_COLLAPSE)
        if err == 0:
            done += HUGE_PAGE
            continue
        if err in (errno.EINVAL, errno.ENOSYS) and done == 0 and not reasons:  # no MADV_COLLAPSE here
            logger.info("weights stay in 4 KiB pages: this kernel has no MADV_COLLAPSE")
            return 0
        reasons.add(errno.errorcode.get(err, str(err)))
    if reasons:
        logger.info("some weight spans stay in 4 KiB pages (%s)", ", ".join(sorted(reasons)))
    return done


def collapse_supported() -> bool:
    """Whether this kernel maps a touched anonymous 2 MiB span with a huge page when asked (tried on
    a span of its own)."""
    region = mmap.mmap(-1, 2 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = torch.frombuffer(region, dtype=torch.uint8)
    buf.fill_(1)
    done = collapse_spans(aligned_spans(buf.data_ptr(), buf.nbytes)[:1])
    del buf
    region.close()
    return done == HUGE_PAGE


def thp_mode() -> str:
    """The system's transparent huge page setting (always, madvise, never), or "unknown"."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unknown"


def collapse_weights(model: nn.Module, workers: int = 2) -> int:
    """Map the model's CPU weights with huge pages where the kernel can; returns the bytes it did.
    The spans are shared among `workers` threads (madvise runs without the GIL)."""
    spans = weight_spans(model)
    with ThreadPoolExecutor(workers) as pool:
        done = sum(pool.map(collapse_spans, [spans[i::workers] for i in range(workers)]))
    logger.info("%.0f of %.0f MiB of weight spans mapped in huge pages", done / 2**20, len(spans) * HUGE_PAGE / 2**20)
    return done


@contextlib.contextmanager
def allocations_in_huge_pages(enabled: bool = True):
    """Within the block, CPU tensors of 2 MiB or more are allocated huge-page-aligned and advised
    (the C++ kernels' allocator); not enabled, or without the kernels, a block like any other."""
    from flashserve.kernels.build import cpu_kernels

    kernels = cpu_kernels() if enabled else None
    if kernels is None:
        yield
        return
    previous = kernels.allocate_in_huge_pages(True)
    try:
        yield
    finally:
        kernels.allocate_in_huge_pages(previous)
