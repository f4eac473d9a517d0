"""Memory: how much RAM is free now, and keeping the allocator from holding on to freed layers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
import ctypes
import ctypes.util


def available_memory() -> Optional[int]:
    """Bytes of RAM available now (Linux ``MemAvailable``, else free pages), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


_HEAP_LIMITED = False


def limit_heap_growth(threshold: int = 1 << 20) -> None:
    """Make glibc serve allocations above ``threshold`` bytes with their own memory maps, once per process.

    The runner allocates and frees a layer's worth of large tensors per step. glibc raises its mmap
    threshold after each large free (up to 32 MB), so later tensors of a few MB come from the heap, which
    fragments and keeps freed memory resident: measured on the 1.1B x8 verify, peak RSS 3.13 GB by default,
    1.90 GB with a fixed 1 MB threshold (docs/benchmarks.md). Fixing the threshold turns that adjustment
    off. A no-op where there is no glibc (macOS, Windows, musl).

    The ``upcycle`` command also sets ``THP_MEM_ALLOC_ENABLE=1`` (huge pages for torch's large tensors,
    2.6x less system CPU in page faults); torch reads it at its first large allocation, so Python API users
    who want it set it in the environment before starting Python.
    """
    global _HEAP_LIMITED
    if _HEAP_LIMITED:
        return
    _HEAP_LIMITED = True

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, ctypes.c_int(threshold))
