"""YAML (and JSON) files written by users, read without aliases: a ten-line "billion laughs" file whose
anchors expand into gigabytes, or a document nested thousands deep, is refused with one clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError, UpcycleError

MAX_BYTES = 1024 * 1024  # a recipe or merge config is a few hundred bytes


class _AliasError(yaml.YAMLError):
    """An alias (``*name``) in text read without aliases."""


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing every alias (``*name``): anchors alone are harmless."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _AliasError(f"aliases (*name) are not allowed (line {mark.line + 1}); write the value out")
        return super().compose_node(parent, index)


def load_yaml_text(text: str, where: str, error: type[UpcycleError] = RecipeError) -> Any:
    """Parse YAML ``text`` safely (no aliases, no Python objects, bounded size and depth).

    Raises ``error`` naming ``where`` on any problem; an empty document is ``None``.
    """
    if len(text) > MAX_BYTES:
        raise error(f"{where}: {len(text)} characters is too large (at most {MAX_BYTES})")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise error(f"cannot parse {where}: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise error(f"cannot parse {where}: nested too deeply") from None


def load_option_value(text: str, where: str) -> Any:
    """A command-line value (``-o KEY=VALUE``) read as a YAML scalar or list: aliases and deep nesting are
    refused like in files; text that is not YAML is kept as the string typed."""
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{where}: {len(text)} characters is too large (at most {MAX_BYTES})")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except _AliasError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply") from None
    except yaml.YAMLError:
        return text


def load_config_file(path: str | Path, what: str = "recipe", error: type[UpcycleError] = RecipeError) -> Any:
    """Read a ``.yaml``/``.yml`` file with :func:`load_yaml_text`, anything else as JSON (NaN and Infinity
    refused); ``error`` names ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    if path.stat().st_size > MAX_BYTES:
        raise error(f"{what} {path}: {path.stat().st_size} bytes is too large (at most {MAX_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"cannot parse {what} {path}: not UTF-8 text") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if path.suffix in (".yaml", ".yml"):
        return load_yaml_text(text, f"{what} {path}", error)
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise error(f"cannot parse {what} {path}: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
