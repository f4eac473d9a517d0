"""Reading a merge config from a file, a mapping or an object, in upcycle's format or mergekit-moe's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .config import MergeConfig, parse_config
from .mergekit import from_mergekit, is_mergekit


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON file, read as recipe files are (:mod:`upcycle.io.yaml_load`: no YAML
    aliases, no NaN/Infinity in JSON, bounded size and depth)."""
    from ..io.yaml_load import load_config_file

    data = load_config_file(path, "merge config")
    if not isinstance(data, dict):
        raise RecipeError(f"merge config {path} must hold a mapping of keys to values")
    return data


def load_config(config: "MergeConfig | dict[str, Any] | str | Path") -> MergeConfig:
    """A validated config from an object, a mapping or a file, in the own format or mergekit-moe's."""
    if isinstance(config, MergeConfig):
        return config.validate()
    data = dict(config) if isinstance(config, dict) else read_mapping(config)
    return from_mergekit(data) if is_mergekit(data) else parse_config(data)
