"""The one reader of text data: calibration text, training data and verify prompts.

A path is a text file, a JSONL file (one JSON record per line, with a ``text`` string) or a folder of
them, searched recursively in sorted order for the suffixes below (any case). A file named directly is
read whatever its suffix: as JSONL when it has a JSONL suffix, else as plain text (UTF-8; bad bytes
are replaced).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Union

from .errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES

Document = Union[str, list]  # raw text, or token ids already (JSONL ``input_ids``)


def is_jsonl(file: str | Path) -> bool:
    """Whether ``file`` is read as JSONL (by its suffix)."""
    return Path(file).suffix.lower() in JSONL_SUFFIXES


def data_files(path: str | Path, label: str = "data") -> list[Path]:
    """The files behind ``path``: the file itself, or every text/JSONL file under a folder (sorted).

    ``label`` names the data in errors (e.g. ``--calibration``).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{label} {path}: the folder holds no {', '.join(SUFFIXES)} files")
        return files
    raise DataError(f"{label} not found: {path} (no such file or folder); pass a text file, a JSONL file "
                    "or a folder of them")


def read_text(file: Path) -> str:
    """A text file's contents (UTF-8, undecodable bytes replaced)."""
    return file.read_text(encoding="utf-8", errors="replace")


def jsonl_records(file: Path, token_ids: bool = False) -> Iterator[Document]:
    """The ``text`` of each record of a JSONL file (blank lines skipped); with ``token_ids``, a record's
    ``input_ids`` list (pre-tokenised data) is taken first."""
    needs = "a 'text' string or an 'input_ids' list" if token_ids else "a 'text' string"
    with file.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{number}: not valid JSON ({exc.msg}); each JSONL line needs {needs}") \
                    from None
            if token_ids and isinstance(record, dict) and isinstance(record.get("input_ids"), list):
                yield [int(t) for t in record["input_ids"]]
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            else:
                raise DataError(f"{file}:{number}: each JSONL record needs {needs}")


def read_documents(path: str | Path, label: str = "data", token_ids: bool = False) -> Iterator[Document]:
    """Documents under ``path``: one per text file (blank files skipped), one per JSONL record."""
    for file in data_files(path, label):
        if is_jsonl(file):
            yield from jsonl_records(file, token_ids)
        else:
            text = read_text(file)
            if text.strip():
                yield text


def read_lines(path: str | Path, label: str = "data") -> list[str]:
    """One entry per non-blank line of each text file and per JSONL record (e.g. prompts)."""
    entries: list[str] = []
    for file in data_files(path, label):
        if is_jsonl(file):
            entries.extend(jsonl_records(file))
        else:
            entries.extend(line for line in read_text(file).splitlines() if line.strip())
    return entries
