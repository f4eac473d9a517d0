"""How much memory there is: free RAM now, and this process's peak resident set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


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
