"""What published files may say about local paths: a Hub id where known, else only the final path
component. ``/home/alice/models/llama-dense`` becomes ``llama-dense``; ``org/name`` stays as it is."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Optional

#: recipe fields that hold a path the user typed
PATH_FIELDS = ("calibration",)


def public_name(spec: Optional[str], repo_id: Optional[str] = None) -> Optional[str]:
    """``repo_id`` when known, else the last component of the local path ``spec`` (None stays None)."""
    if repo_id:
        return repo_id
    if spec is None:
        return None
    text = str(spec).rstrip("/\\")
    return PurePath(text).name or text


def public_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe as written into published files: path fields reduced to their final component."""
    return {k: (public_name(v) if k in PATH_FIELDS and isinstance(v, str) else v) for k, v in recipe.items()}
