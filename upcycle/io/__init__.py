"""Readers for dense checkpoints and the streaming safetensors writer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..checkpoint import CONFIG_FILE
from ..errors import SourceNotFoundError
from .source import DenseSource

__all__ = ["DenseSource", "open_source"]


def open_source(spec: str, revision: Optional[str] = None, quiet: bool = False,
                headers_only: bool = False) -> DenseSource:
    """Open a dense checkpoint: a local folder, a ``.gguf`` file, or a Hub repo id (``namespace/name``).

    ``headers_only`` (for dry runs) lets a Hub source skip downloading weights.
    """
    from .folder import open_folder
    from .hub import download, looks_like_repo_id, open_headers

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            from .gguf import GGUFSource

            return GGUFSource(path, spec)
        raise SourceNotFoundError(f"{spec} is a file but not a .gguf model; pass the model's folder instead")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / CONFIG_FILE).is_file() and len(ggufs) == 1:
            from .gguf import GGUFSource

            return GGUFSource(ggufs[0], spec)
        return open_folder(path, spec)
    if looks_like_repo_id(spec):
        if headers_only:
            return open_headers(spec, revision, quiet=quiet)
        folder = download(spec, revision, quiet=quiet)
        source = open_folder(folder, spec)
        source.repo_id, source.commit = spec, folder.name
        return source
    raise SourceNotFoundError(f"{spec}: no such folder or .gguf file, and not a Hub repo id (namespace/name)")
