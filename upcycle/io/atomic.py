"""Atomic output folders: write into a hidden temporary sibling, rename into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from ..errors import OutputExistsError, WriteError


def check_output(output: Path, force: bool, source_folder: Path | None = None) -> None:
    """Refuse a non-empty output without ``force``, and any output that would replace the source."""
    output = Path(output)
    if source_folder is not None:
        out, src = output.resolve(), Path(source_folder).resolve()
        if out == src or out in src.parents:
            raise OutputExistsError(f"output {output} would replace the source model; choose another folder")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is a file; choose a folder name")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputExistsError(f"output folder {output} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def atomic_folder(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; on success it becomes ``output``, on any failure
    (Ctrl-C included) it is removed and ``output`` is left as it was."""
    output = Path(output)
    check_output(output, force)
    parent = output.parent if str(output.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{output.name}.upcycle-tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise WriteError(f"cannot create the output next to {output}: {exc.strerror or exc}") from None
    try:
        yield tmp
        _fsync_dir(tmp)
        if output.exists():
            old = parent / f".{output.name}.upcycle-old-{uuid.uuid4().hex[:8]}"
            os.rename(output, old)
            try:
                os.rename(tmp, output)
            except BaseException:
                os.rename(old, output)  # the old output goes back under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
        _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise WriteError(f"writing {output} failed: {exc.strerror or exc}"
                             f"{' (disk full)' if exc.errno == 28 else ''}; nothing was written") from None
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
