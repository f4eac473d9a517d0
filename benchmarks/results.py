"""Benchmark results as JSON under benchmarks/results/: figures plus where, when and on what they were measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return done.stdout.strip() + ("-dirty" if dirty else "") if done.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    """A one-line description of this machine (CPU model, cores, memory)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}"


RESULTS = ROOT / "benchmarks" / "results"


def write_result(name: str, settings: dict[str, Any], rows: Any, folder: str | Path = RESULTS) -> Path:
    """Write one benchmark's results with commit, machine and UTC time to ``folder/NAME-COMMIT.json``
    (benchmarks/render_docs.py renders the docs from the newest file of each benchmark); returns the path."""
    import torch
    import transformers

    result = {
        "benchmark": name,
        "commit": _commit(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": settings,
        "rows": rows,
    }
    path = Path(folder) / f"{name}-{result['commit']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
