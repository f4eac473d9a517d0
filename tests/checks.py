"""Shared assertions for the CLI tests: clean one-line errors, nothing left behind, file hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner, Result

from upcycle.cli import cli


def run_cli(*args: str) -> Result:
    """Invoke the ``upcycle`` CLI in-process (stdout and stderr kept apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary siblings and lock files that an interrupted or failed conversion must not leave behind."""
    return sorted(p.name for p in Path(parent).iterdir()
                  if any(tag in p.name for tag in (".upcycle-tmp-", ".upcycle-old-", ".upcycle-lock")))


def assert_clean_error(result: Result, output: Path, *fragments: str) -> str:
    """A user error: non-zero exit, exactly one ``error:`` line naming ``fragments``, no traceback,
    nothing under ``output`` and no temporary folder beside it. Returns the error line."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    text = result.output
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not Path(output).exists(), f"{output} was written"
    assert leftovers(Path(output).parent) == []
    return errors[0]


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_writes_after(monkeypatch, exc: BaseException, after: int = 2) -> None:
    """Make the shard writer raise ``exc`` once ``after`` tensors were written (disk full, Ctrl-C, ...)."""
    import upcycle.io.writer as writer

    real, count = writer.write_tensor_bytes, [0]

    def failing(f, spec, tensor):
        count[0] += 1
        if count[0] > after:
            raise exc
        return real(f, spec, tensor)

    monkeypatch.setattr(writer, "write_tensor_bytes", failing)
