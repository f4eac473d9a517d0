"""Atomic output folders: write into a hidden temporary sibling, rename into place only on success.

Around that: an output may not overlap the source; the free space must hold the planned bytes; a lock
file (created atomically, holding pid and host) lets one run at a time claim an output; temporary
folders carry the pid and host of their run, so a later run removes those of a dead run and says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import OutputExistsError, WriteError

#: room for config, tokenizer and card files beside the planned shard bytes
METADATA_ALLOWANCE = 64 * 1024 * 1024
_LEFTOVER = re.compile(r"\.upcycle-(?:tmp|old)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_.-]+)-[0-9a-f]{8}$")


def check_output(output: Path, force: bool, source: Path | None = None) -> None:
    """Refuse a non-empty output without ``force``, and any output that overlaps the source (the source
    folder or file itself, a folder holding it, or a folder inside it)."""
    output = Path(output)
    if source is not None:
        out, src = output.resolve(), Path(source).resolve()
        if out == src or out in src.parents:
            raise OutputExistsError(f"output {output} would replace the source model; choose another folder")
        if src in out.parents:
            raise OutputExistsError(f"output {output} is inside the source model's folder {source}; "
                                    "choose a folder outside it (the source is never modified)")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is a file; choose a folder name")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputExistsError(f"output folder {output} exists and is not empty; pass --force to replace it")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@contextlib.contextmanager
def atomic_folder(output: Path, force: bool = False, need_bytes: Optional[int] = None,
                  notify: Callable[[str], None] = _note) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; on success it becomes ``output``, on any failure
    (Ctrl-C included) it is removed and ``output`` is left as it was.

    ``need_bytes``: what will be written; refused up front when the file system has less free.
    Concurrent runs for one ``output`` are refused while this one holds its lock; leftovers of
    dead runs for ``output`` are removed (``notify`` says so).
    """
    output = Path(output)
    check_output(output, force)
    parent = output.parent if str(output.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create the output next to {output}: {exc.strerror or exc}") from None
    with _output_lock(parent, output, notify):
        remove_dead_leftovers(parent, output.name, notify)
        check_output(output, force)  # again, now that no other run can claim it
        if need_bytes is not None:
            check_free_space(output, need_bytes)
        try:
            tmp = parent / f".{output.name}.upcycle-tmp-{_run_tag()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as exc:
            raise WriteError(f"cannot create the output next to {output}: {exc.strerror or exc}") from None
        try:
            yield tmp
            _fsync_dir(tmp)
            _move_into_place(tmp, output, parent, force)
            _fsync_dir(parent)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise WriteError(f"writing {output} failed: {exc.strerror or exc}"
                                 f"{' (disk full)' if exc.errno == errno.ENOSPC else ''}; nothing was written") from None
            raise


def _move_into_place(tmp: Path, output: Path, parent: Path, force: bool) -> None:
    """Rename ``tmp`` to ``output``; an existing output (a folder, or a link, which is replaced and not
    followed) is moved aside first and removed after."""
    if not (output.exists() or output.is_symlink()):
        os.rename(tmp, output)
        return
    if not force and output.is_dir() and any(output.iterdir()):
        raise OutputExistsError(f"output folder {output} appeared while converting; nothing was written")
    old = parent / f".{output.name}.upcycle-old-{_run_tag()}-{uuid.uuid4().hex[:8]}"
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)  # the old output goes back under its name
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def free_bytes(folder: Path) -> int:
    """Bytes free for this user on ``folder``'s file system."""
    return shutil.disk_usage(folder).free


def check_free_space(output: Path, planned: int) -> None:
    """Refuse (before anything is written) when the file system ``output`` goes to has less free than the
    ``planned`` shard bytes plus :data:`METADATA_ALLOWANCE`."""
    output = Path(output).absolute()
    parent = next(p for p in output.parents if p.exists())
    need, free = planned + METADATA_ALLOWANCE, free_bytes(parent)
    if need > free:
        raise WriteError(f"not enough free space for {output}: it needs about {_size(need)} ({need} bytes), "
                         f"the file system of {parent} has {_size(free)} ({free} bytes) free; free some space, "
                         "choose another folder or reduce --num-experts; nothing was written")


def _size(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def _run_tag() -> str:
    return f"{os.getpid()}-{_host()}"


def _alive(pid: int, host: str) -> bool:
    """Whether run ``pid`` on ``host`` may still be running (another host's runs are assumed alive)."""
    if host != _host():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user has that pid
        return True
    return True


def remove_dead_leftovers(parent: Path, name: str, notify: Callable[[str], None] = _note) -> list[str]:
    """Remove ``.NAME.upcycle-tmp-*``/``-old-*`` folders of runs on this host that are no longer running
    (killed with SIGKILL, power loss); returns their names."""
    removed = []
    prefix = f".{name}.upcycle-"
    for path in sorted(Path(parent).glob(f".{glob_escape(name)}.upcycle-*")):
        match = _LEFTOVER.search(path.name)
        if not path.name.startswith(prefix) or not match or _alive(int(match["pid"]), match["host"]):
            continue
        size = _tree_bytes(path)
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
        notify(f"removed {path.name} ({_size(size)}) left by an interrupted upcycle run (pid {match['pid']})")
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _tree_bytes(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


@contextlib.contextmanager
def _output_lock(parent: Path, output: Path, notify: Callable[[str], None]) -> Iterator[None]:
    """Hold ``.NAME.upcycle-lock`` beside ``output`` (created without replacing, holding "pid host")."""
    lock = parent / f".{output.name}.upcycle-lock"
    for _ in range(2):
        if _try_create(lock):
            break
        holder = _read_lock(lock)
        if holder is not None and not _alive(*holder):
            lock.unlink(missing_ok=True)
            notify(f"removed the lock of an interrupted upcycle run (pid {holder[0]}) on {output}")
            continue
        who = f"pid {holder[0]} on {holder[1]}" if holder else f"see {lock}"
        raise OutputExistsError(f"another upcycle run ({who}) is writing {output}; wait for it to finish or choose "
                                f"another output (if no run is writing it, remove {lock})")
    else:  # pragma: no cover - a third run took the freed lock between our two tries
        raise OutputExistsError(f"another upcycle run is writing {output}; choose another output")
    try:
        yield
    finally:
        if _read_lock(lock) == (os.getpid(), _host()):
            lock.unlink(missing_ok=True)


def _try_create(lock: Path) -> bool:
    """Create ``lock`` with our pid and host, atomically: written aside, then hard-linked into place
    (which fails when it exists); file systems without hard links get ``O_EXCL`` and a write."""
    content = f"{os.getpid()} {_host()}\n".encode()
    staged = lock.with_name(f"{lock.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        staged.write_bytes(content)
        try:
            os.link(staged, lock)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            return True
    except OSError as exc:
        raise WriteError(f"cannot create {lock}: {exc.strerror or exc}") from None
    finally:
        staged.unlink(missing_ok=True)


def _read_lock(lock: Path) -> Optional[tuple[int, str]]:
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


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
