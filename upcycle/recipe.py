"""The conversion recipe: one immutable description of a conversion, validated once when it is made.

Common options are fields of :class:`Recipe`; the options an expert method owns live in its own
dataclass (``recipe.method_options``, see :mod:`upcycle.experts.base`). Files and the CLI use flat keys
(``granularity: 4``); :meth:`Recipe.from_dict` routes each to its owner and :meth:`Recipe.to_dict` writes
them flat again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import RecipeError
from .experts import MethodOptions, get_method, option_owners
from .experts.base import require_integer
from .io.yaml_load import load_config_file
from .layers import check_layer_spec
from .routers import get_router_init

DTYPES = ("auto", "bfloat16", "float16", "float32")
MAX_SEED = 2**32 - 1
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: key order of recipe files (older files wrote every key in this order); keys added later follow
FILE_ORDER = ("num_experts", "top_k", "method", "target", "router_init", "router_std", "seed", "dtype",
              "max_shard_size", "revision", "granularity", "split_strategy", "shared_experts", "allow_inexact",
              "drop_ratio", "noise_std", "layers", "calibration", "calibration_tokens")
CALIBRATION_HELP = "a .txt/.md file, a .jsonl file with a 'text' field, or a folder of them"


def parse_size(value: int | str) -> int:
    """Parse a byte size such as ``5GB``, ``500MiB`` or ``1000000`` (the transformers convention)."""
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
            size = int(float(number) * _SIZE_UNITS[unit])
        except (ValueError, OverflowError):
            raise RecipeError(f"--max-shard-size: cannot read {value!r}; use a size such as 5GB or 500MB") from None
    if size <= 0:
        raise RecipeError(f"--max-shard-size must be positive, got {value!r}")
    return size


def option_flag(name: str) -> str:
    """The command-line flag of an option or recipe field: ``learning_rate`` -> ``--learning-rate``."""
    return "--" + name.replace("_", "-")


def check_number(value: Any, where: str, minimum: Optional[float] = None, strict: bool = False) -> float:
    """``value`` as a float: a finite number (not a bool or a text), and ``>= minimum`` (``>`` when ``strict``)
    when a minimum is given. A NaN or infinite option would make a model of NaNs or fail deep inside a run;
    ``where`` names the option or field in the :class:`RecipeError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where} must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise RecipeError(f"{where} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def check_field_types(recipe: "Recipe") -> None:
    """Each field holds a value of its declared type (recipe files can hold anything); numbers are finite.

    Raises :class:`RecipeError` naming the field: a NaN ``router_std`` would otherwise make an all-NaN
    model that compares as "exact", and ``num_experts: "8"`` would fail deep inside planning.
    """
    hints = _hints(type(recipe))
    for f in dataclasses.fields(recipe):
        if f.name in _UNCHECKED:
            continue
        value, kinds = getattr(recipe, f.name), _KINDS.get(f.name) or _allowed(hints[f.name])
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(sorted({_TYPE_NAMES.get(k, k.__name__) for k in kinds}))
            raise RecipeError(f"recipe field '{f.name}' ({option_flag(f.name)}) must be {names}, "
                              f"got {value!r} ({type(value).__name__})")
        if isinstance(value, float):
            check_number(value, option_flag(f.name))


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a mapping", type(None): "null", list: "a list"}
#: fields that accept more than their annotation says
_KINDS = {"max_shard_size": (str, int), "layers": (str, int, list, tuple)}
_UNCHECKED = ("method_options",)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] or X | None
        return tuple(k for arg in typing.get_args(hint) for k in _allowed(arg))
    if hint is float:
        return (int, float)
    return (origin or hint,)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a conversion's output, apart from the source and output paths.

    The same recipe with the same source always writes byte-identical files. Construction validates
    every value that needs no model and raises :class:`RecipeError` with the fix.
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
    allow_inexact: bool = False
    noise_std: float = 0.0
    layers: str = "all"
    calibration: Optional[str] = None
    calibration_tokens: int = 16384
    #: the options of ``method`` (its :class:`~upcycle.experts.MethodOptions` dataclass); None: its defaults
    method_options: Optional[MethodOptions] = None

    def __post_init__(self) -> None:
        check_field_types(self)
        require_integer("num-experts", self.num_experts, 1)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= self.num_experts:
            raise RecipeError(
                f"--top-k must be between 1 and the number of experts ({self.num_experts}), got {self.top_k!r}")
        if self.dtype not in DTYPES:
            raise RecipeError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.router_std < 0:  # check_field_types made it a finite number
            raise RecipeError(f"--router-std must be >= 0, got {self.router_std}")
        if self.noise_std < 0:
            raise RecipeError(f"--noise-std must be >= 0, got {self.noise_std}")
        require_integer("seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise RecipeError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        require_integer("calibration-tokens", self.calibration_tokens, 1)
        method = get_method(self.method)
        get_router_init(self.router_init)
        parse_size(self.max_shard_size)
        object.__setattr__(self, "layers", check_layer_spec(self.layers))
        if self.method_options is None:
            object.__setattr__(self, "method_options", method.options())
        elif type(self.method_options) is not method.options:
            raise RecipeError(f"method_options {type(self.method_options).__name__} do not belong to --method "
                              f"{self.method} (it takes {method.options.__name__})")
        self.method_options.check(self)
        reasons = self.calibration_reasons()
        if reasons and not self.calibration:
            raise RecipeError(f"{' and '.join(reasons)} need(s) calibration text: pass --calibration PATH "
                              f"({CALIBRATION_HELP})")

    def validate(self) -> "Recipe":
        """A recipe is validated when it is made; kept so that ``recipe.validate()`` chains."""
        return self

    # --- what the recipe needs -----------------------------------------------------------------
    def calibration_reasons(self) -> list[str]:
        """The options that read ``--calibration`` text (empty when none does): the one place that decides."""
        reasons = list(self.method_options.calibration_reasons() if self.method_options else [])
        if get_router_init(self.router_init).needs_calibration:
            reasons.append(f"--router-init {self.router_init}")
        return reasons

    @property
    def wants_hidden_states(self) -> bool:
        """The router init reads the hidden states entering each MoE layer's FFN on calibration text."""
        return get_router_init(self.router_init).needs_calibration

    @property
    def wants_activations(self) -> bool:
        """The expert method reads the FFN neurons' activations on calibration text."""
        return bool(self.method_options.calibration_reasons())

    @property
    def needs_layer_data(self) -> bool:
        """Planning reads dense FFN matrices or calibration statistics (not only shapes)."""
        return bool(self.calibration_reasons()) or self.method_options.needs_weights()

    def option(self, name: str) -> Any:
        """A method option by its flat name (``granularity``), the method's default when another method owns it."""
        owner = option_owners()[name]
        source = self.method_options if owner.name == self.method else owner.options()
        return getattr(source, name)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat keys, every method's options included (the selected method's values, the others' defaults)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_options"}
        flat.update({name: self.option(name) for name in option_owners()})
        order = {key: i for i, key in enumerate(FILE_ORDER)}
        return dict(sorted(flat.items(), key=lambda item: order.get(item[0], len(order))))

    @classmethod
    def keys(cls) -> list[str]:
        """Every flat key a recipe file or the API accepts."""
        common = [f.name for f in dataclasses.fields(cls) if f.name != "method_options"]
        return common + sorted(option_owners())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Build a recipe from flat keys; keys written as provenance (``upcycle``) are ignored, and options
        of a method other than ``method`` must keep their defaults."""
        data = {str(k).replace("-", "_"): v for k, v in data.items() if k != "upcycle"}
        if data.get("extra") in ({}, None):  # written by upcycle 0.1, never used
            data.pop("extra", None)
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise RecipeError(f"unknown recipe key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(cls.keys()))}")
        owners = option_owners()
        options = {k: data.pop(k) for k in list(data) if k in owners}
        method = get_method(data.get("method", cls.method))
        foreign = [k for k, v in options.items()
                   if owners[k].name != method.name and v != owners[k].options.fields()[k]]
        if foreign:
            flags = " and ".join(option_flag(k) for k in foreign)
            owner = " / ".join(sorted({owners[k].name for k in foreign}))
            verb = "needs" if len(foreign) == 1 else "need"
            raise RecipeError(f"{flags} {verb} --method {owner} (got --method {method.name})")
        own = {k: v for k, v in options.items() if owners[k].name == method.name}
        return cls(**data, method_options=method.options(**own))

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a .json or .yaml file (an ``upcycle_recipe.json`` output works too); YAML
        aliases, NaN/Infinity literals and oversized files are refused (:mod:`upcycle.io.yaml_load`)."""
        data = load_config_file(path, "recipe")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path} must hold a mapping of keys to values")
        return cls.from_dict(data)

    def replace(self, **flat: Any) -> "Recipe":
        """A new recipe with some flat keys changed (None values are ignored)."""
        return self.from_dict({**self.to_dict(), **{k: v for k, v in flat.items() if v is not None}})
