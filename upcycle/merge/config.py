"""The merge config in upcycle's own format: which source gives each expert, how the routers start.

A config is YAML or JSON; :func:`upcycle.merge.loading.load_config` also accepts mergekit-moe's YAML
(see :mod:`.mergekit`) and tells the two apart by their keys.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..card import check_base_model
from ..errors import RecipeError
from ..recipe import DTYPES, MAX_SEED, check_number, parse_size

SHARED_WEIGHTS = ("base", "average")
ROUTER_INITS = ("hidden", "embed", "domain", "normal", "uniform", "zeros")
#: router inits that read each expert's prompts, and the one that reads its calibration text
PROMPT_ROUTERS = ("hidden", "embed")
DATA_ROUTERS = ("domain",)


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: the checkpoint whose FFN it holds, and what its router row is built from."""

    source: str
    prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    calibration: Optional[str] = None
    revision: Optional[str] = None
    #: scales the expert's down projection (mergekit ``residual_scale``)
    residual_scale: float = 1.0
    #: Gaussian noise added to the expert's weights (mergekit ``noise_scale``)
    noise_std: float = 0.0


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge: base model, experts, routing and output options."""

    experts: tuple[ExpertSpec, ...]
    base_model: Optional[str] = None
    base_revision: Optional[str] = None
    shared_weights: str = "base"
    top_k: int = 2
    router_init: str = "hidden"
    router_std: float = 0.02
    target: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_shard_size: str = "5GB"
    calibration_tokens: int = 16384
    #: an always-on shared expert (mergekit ``shared_experts``), held by targets that have one
    shared_expert: Optional[ExpertSpec] = None
    #: Hub ids for the model card's ``base_model`` (``--base-model``); empty: the sources' own ids, derived as
    #: ``convert`` derives one (Hub id, cache snapshot folder, config ``_name_or_path``). Not named
    #: ``base_model``: in merge configs (and mergekit's) that key names the model giving the shared weights.
    card_base_model: tuple[str, ...] = ()
    #: where the config came from: "upcycle" or "mergekit"
    format: str = "upcycle"
    #: how options were translated (e.g. mergekit options honoured differently), shown to the user
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.card_base_model, (str, list)):  # one id, or a list from a file or the API
            ids = (self.card_base_model,) if isinstance(self.card_base_model, str) else tuple(self.card_base_model)
            object.__setattr__(self, "card_base_model", ids)

    @property
    def base(self) -> str:
        """The model that gives the non-FFN weights (the first expert's source when none is named)."""
        return self.base_model or self.experts[0].source

    @property
    def sources(self) -> list[str]:
        """Distinct expert (and shared-expert) sources, in first-use order."""
        names = [e.source for e in self.experts] + ([self.shared_expert.source] if self.shared_expert else [])
        return list(dict.fromkeys(names))

    def validate(self) -> "MergeConfig":
        """Check what needs no model; raise :class:`RecipeError` naming the key and the fix."""
        if not self.experts:
            raise RecipeError("experts: list at least one expert (each with a 'source')")
        for name in ("base_model", "base_revision"):
            _optional_text(getattr(self, name), name)
        if not isinstance(self.target, str) or not self.target:
            raise RecipeError(f"target must be a target name (auto, mixtral, ...), got {self.target!r}")
        if not _integer(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise RecipeError(f"seed must be an integer between 0 and {MAX_SEED}, got {self.seed!r}")
        if not isinstance(self.max_shard_size, str) and not _integer(self.max_shard_size):
            raise RecipeError(f"max_shard_size must be a size such as 5GB, got {self.max_shard_size!r}")
        if self.shared_weights not in SHARED_WEIGHTS:
            raise RecipeError(f"shared_weights must be one of {', '.join(SHARED_WEIGHTS)}, got {self.shared_weights!r}")
        if self.router_init not in ROUTER_INITS:
            raise RecipeError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= len(self.experts):
            raise RecipeError(f"top_k must be between 1 and the number of experts ({len(self.experts)}), "
                              f"got {self.top_k!r}")
        if self.dtype not in DTYPES:
            raise RecipeError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_number(self.router_std, "router_std", minimum=0)
        if not _integer(self.calibration_tokens) or self.calibration_tokens < 1:
            raise RecipeError(f"calibration_tokens must be an integer >= 1, got {self.calibration_tokens!r}")
        parse_size(self.max_shard_size)
        for index, expert in enumerate(self.experts):
            _check_expert(expert, f"experts[{index}]", self.router_init)
        if self.shared_expert is not None:
            _check_expert(self.shared_expert, "shared_expert", "zeros")
        _check_card_base_model(self.card_base_model)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (written into the output's provenance)."""
        data = dataclasses.asdict(self)
        data["experts"] = [_expert_dict(e) for e in self.experts]
        data["shared_expert"] = _expert_dict(self.shared_expert) if self.shared_expert else None
        return data


def _expert_dict(expert: ExpertSpec) -> dict[str, Any]:
    data = dataclasses.asdict(expert)
    data["prompts"], data["negative_prompts"] = list(expert.prompts), list(expert.negative_prompts)
    return data


def _check_card_base_model(ids: Any) -> None:
    where = "--base-model (card_base_model)"
    if not isinstance(ids, tuple) or not all(isinstance(i, str) for i in ids):
        raise RecipeError(f"{where}: give Hub repo ids (namespace/name), one or a list, got {ids!r}")
    for repo_id in ids:
        check_base_model(repo_id, where)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_text(value: Any, where: str) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise RecipeError(f"{where} must be a string (a path, Hub id or revision), got {value!r}")


def _check_expert(expert: ExpertSpec, where: str, router_init: str) -> None:
    if not isinstance(expert.source, str) or not expert.source:
        raise RecipeError(f"{where}.source: give the checkpoint (folder, .gguf file or Hub id) of this expert")
    _optional_text(expert.revision, f"{where}.revision")
    if expert.calibration is not None and not isinstance(expert.calibration, (str, os.PathLike)):
        raise RecipeError(f"{where}.calibration must be a path (text, JSONL or a folder), got {expert.calibration!r}")
    for name in ("prompts", "negative_prompts"):
        values = getattr(expert, name)
        if not all(isinstance(p, str) and p.strip() for p in values):
            raise RecipeError(f"{where}.{name}: every prompt must be a non-empty string")
    if router_init in PROMPT_ROUTERS and not expert.prompts:
        raise RecipeError(f"{where} ({expert.source}) has no prompts, and router_init {router_init} builds each "
                          "router row from its expert's prompts: add 'prompts', or use router_init domain, normal "
                          "or zeros")
    if router_init in DATA_ROUTERS and not expert.calibration:
        raise RecipeError(f"{where} ({expert.source}) has no calibration text, and router_init domain routes by "
                          "each expert's domain data: add 'calibration: PATH' (text, JSONL or a folder)")
    check_number(expert.residual_scale, f"{where}.residual_scale", minimum=0, strict=True)
    check_number(expert.noise_std, f"{where}.noise_std", minimum=0)


EXPERT_KEYS = {"source", "prompts", "negative_prompts", "calibration", "revision", "residual_scale", "noise_std"}
TOP_KEYS = {f.name for f in dataclasses.fields(MergeConfig)} - {"format", "notes"}


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise RecipeError(f"{where}: give a list of strings")
    return tuple(value)


def parse_expert(data: Any, where: str) -> ExpertSpec:
    """One expert of the own format (a mapping, or just the source as a string)."""
    if isinstance(data, str):
        data = {"source": data}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: each expert is a mapping with at least 'source'")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - EXPERT_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(EXPERT_KEYS))}")
    if "source" not in data:
        raise RecipeError(f"{where}: missing 'source' (the checkpoint this expert's FFN comes from)")
    return ExpertSpec(source=str(data["source"]), prompts=_strings(data.get("prompts"), f"{where}.prompts"),
                      negative_prompts=_strings(data.get("negative_prompts"), f"{where}.negative_prompts"),
                      calibration=data.get("calibration"), revision=data.get("revision"),
                      residual_scale=check_number(data.get("residual_scale", 1.0), f"{where}.residual_scale", 0,
                                                  strict=True),
                      noise_std=check_number(data.get("noise_std", 0.0), f"{where}.noise_std", 0))


def parse_config(data: dict[str, Any]) -> MergeConfig:
    """A :class:`MergeConfig` from a mapping in the own format; unknown keys are refused."""
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown merge config key(s): {', '.join(unknown)}; "
                          f"known keys: {', '.join(sorted(TOP_KEYS))}")
    experts = data.pop("experts", None)
    if not isinstance(experts, list) or not experts:
        raise RecipeError("experts: list at least one expert (each with a 'source')")
    shared = data.pop("shared_expert", None)
    return MergeConfig(experts=tuple(parse_expert(e, f"experts[{i}]") for i, e in enumerate(experts)),
                       shared_expert=parse_expert(shared, "shared_expert") if shared is not None else None,
                       **data).validate()
