"""The conversion recipe: one validated dataclass with a JSON/YAML round-trip."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
import typing
from pathlib import Path
from typing import Any, Optional

from .errors import RecipeError

DTYPES = ("auto", "bfloat16", "float16", "float32")
MAX_SEED = 2**32 - 1
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Parse a byte size such as ``5GB``, ``500MiB`` or ``1000000`` (the transformers convention)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RecipeError(f"--max-shard-size: cannot read {value!r}; use a size such as 5GB or 500MB")
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip().upper().replace(" ", "")
        number, unit = text, "B"
        for suffix in sorted(_SIZE_UNITS, key=len, reverse=True):
            if text.endswith(suffix):
                number, unit = text[: -len(suffix)], suffix
                break
        try:
            scaled = float(number) * _SIZE_UNITS[unit]
        except ValueError:
            scaled = math.nan
        if not math.isfinite(scaled):
            raise RecipeError(f"--max-shard-size: cannot read {value!r}; use a size such as 5GB or 500MB")
        size = int(scaled)
    if size <= 0:
        raise RecipeError(f"--max-shard-size must be positive, got {value!r}")
    return size


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_field_types(recipe: "Recipe") -> None:
    """Each field holds a value of its declared type (recipe files can hold anything); numbers are finite.

    Raises :class:`RecipeError` naming the field: a NaN ``router_std`` would otherwise make an all-NaN
    model that compares as "exact".
    """
    hints = typing.get_type_hints(type(recipe))
    for f in dataclasses.fields(recipe):
        value, hint = getattr(recipe, f.name), hints[f.name]
        kinds = _KINDS.get(f.name) or _allowed(hint)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(sorted({_TYPE_NAMES[k] for k in kinds}))
            flag = "" if f.name == "extra" else f" ({_flag(f.name)})"
            raise RecipeError(f"recipe field '{f.name}'{flag} must be {names}, "
                              f"got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{_flag(f.name)} must be a finite number, got {value}")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a mapping", type(None): "null", list: "a list"}
#: fields that accept more than their annotation says
_KINDS = {"max_shard_size": (str, int), "layers": (str, int, list)}


def _allowed(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return tuple(k for arg in typing.get_args(hint) for k in _allowed(arg))
    if hint is float:
        return (int, float)
    return (origin or hint,)


@dataclass
class Recipe:
    """Everything that determines a conversion's output, apart from the source and output paths.

    The same recipe with the same source always writes byte-identical files.
    """

    num_experts: int = 8
    top_k: int = 2
    method: str = "replicate"
    target: str = "auto"
    router_init: str = "normal"
    router_std: float = 0.02
    seed: int = 0
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    revision: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
    # --- expert methods (docs/methods.md) -------------------------------------------------------
    granularity: int = 1
    split_strategy: str = "contiguous"
    shared_experts: int = 0
    allow_inexact: bool = False
    drop_ratio: float = 0.5
    noise_std: float = 0.0
    layers: str = "all"
    calibration: Optional[str] = None
    calibration_tokens: int = 16384

    def validate(self) -> "Recipe":
        """Check the values that need no model; raise :class:`RecipeError` with the fix."""
        from .experts import get_method
        from .routers import get_router_init

        check_field_types(self)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise RecipeError(f"--num-experts must be an integer >= 1, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise RecipeError(
                f"--top-k must be between 1 and the number of experts ({self.num_experts}), got {self.top_k!r}"
            )
        if self.dtype not in DTYPES:
            raise RecipeError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.router_std < 0:
            raise RecipeError(f"--router-std must be >= 0, got {self.router_std}")
        if not 0 <= self.seed <= MAX_SEED:
            raise RecipeError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        get_method(self.method)
        get_router_init(self.router_init)
        parse_size(self.max_shard_size)
        from .method_checks import check_method_options

        check_method_options(self)
        return self

    @property
    def routed_group_size(self) -> int:
        """Experts per virtual group: the FFN segments that are routed (granularity minus shared)."""
        return self.granularity - self.shared_experts

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Build a recipe from a mapping; keys written as provenance (``upcycle``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items() if k != "upcycle"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecipeError(f"unknown recipe key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a .json or .yaml file (an ``upcycle_recipe.json`` output works too)."""
        from .io.yaml_load import load_config_file

        data = load_config_file(path, "recipe")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path} must hold a mapping of keys to values")
        if not all(isinstance(k, str) for k in data):
            raise RecipeError(f"recipe {path}: every key must be a string")
        return cls.from_dict(data)
