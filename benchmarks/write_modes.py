"""How fast can one process write a large file here? Buffered vs periodic fdatasync vs O_DIRECT.

    python benchmarks/write_modes.py --gb 4 --dir /work/benchdata

The numbers behind the choice of direct I/O in upcycle/io/staged.py (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from pathlib import Path

CHUNK = 23068672  # one bf16 2048x5632 matrix


def write_file(path: Path, total: int, mode: str) -> tuple[float, float]:
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1024) * (CHUNK // 1024))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags, 0o644)
    start, written, synced = time.perf_counter(), 0, 0
    try:
        while written < total:
            written += os.write(fd, buf)
            if mode == "sync256" and written - synced >= 256 << 20:
                os.fdatasync(fd)
                synced = written
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return written, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--dir", type=Path, default=Path("/work/benchdata"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    for mode in ("buffered", "sync256", "direct"):
        written, seconds = write_file(args.dir / f"write-{mode}.bin", int(args.gb * 1e9), mode)
        print(f"{mode:9s} {written / 1e9:.2f} GB in {seconds:5.1f} s = {written / 1e6 / seconds:5.0f} MB/s")


if __name__ == "__main__":
    main()
