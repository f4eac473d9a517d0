"""mergekit-moe's YAML (mergekit 0.1.5, ``mergekit-moe config.yml out``) read as it is.

Each mergekit option is honoured or refused with the reason; docs/merge.md has the table.
"""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError
from ..recipe import check_number
from .config import ExpertSpec, MergeConfig

#: mergekit gate_mode -> (upcycle router_init, router_std or None for the default)
GATE_MODES = {"hidden": ("hidden", None), "hidden_avg": ("hidden", None), "cheap_embed": ("embed", None),
              "random": ("normal", 1.0), "uniform_random": ("uniform", None)}
#: mergekit architecture -> upcycle target
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen3": "qwen3_moe"}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
          "float32": "float32", "fp32": "float32", "float": "float32"}
TOP_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
#: keys that only mergekit-moe uses: any of them marks a config as mergekit's
MARKERS = {"gate_mode", "experts_per_token", "shared_experts", "architecture"}


def is_mergekit(data: dict[str, Any]) -> bool:
    """True when the mapping is a mergekit-moe config (its own keys, or experts given as ``source_model``)."""
    experts = data.get("experts")
    return bool(MARKERS & set(data)) or (isinstance(experts, list) and any(
        isinstance(e, dict) and ("source_model" in e or "positive_prompts" in e) for e in experts))


def _reference(value: Any, where: str) -> tuple[str, Any]:
    """A mergekit ModelReference (``org/model``, ``org/model@revision``, or ``{model: {path, revision}}``)."""
    if isinstance(value, dict):
        if value.get("lora"):
            raise RecipeError(f"{where}: LoRA references are not supported; merge the adapter into its model first "
                              "(peft's merge_and_unload) and list that folder")
        model = value.get("model", value)
        if not isinstance(model, dict) or "path" not in model:
            raise RecipeError(f"{where}: give the model as a string or as {{model: {{path: ...}}}}")
        return str(model["path"]), model.get("revision")
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: give the model as a string (folder or Hub id)")
    if "+" in value:
        raise RecipeError(f"{where}: {value!r} applies a LoRA adapter ('model+lora'), which upcycle does not do; "
                          "merge the adapter into its model first (peft's merge_and_unload) and list that folder")
    path, _, revision = value.partition("@")
    return path, revision or None


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise RecipeError(f"{where}: give a list of strings")
    return tuple(value)


def _expert(data: Any, where: str, gate_mode: str) -> ExpertSpec:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: each expert is a mapping with 'source_model'")
    unknown = sorted(set(data) - EXPERT_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown mergekit-moe key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(EXPERT_KEYS))}")
    if "source_model" not in data:
        raise RecipeError(f"{where}: missing 'source_model'")
    source, revision = _reference(data["source_model"], f"{where}.source_model")
    return ExpertSpec(source=source, revision=revision,
                      prompts=_prompts(data.get("positive_prompts"), f"{where}.positive_prompts"),
                      negative_prompts=_prompts(data.get("negative_prompts"), f"{where}.negative_prompts"),
                      residual_scale=check_number(_given(data, "residual_scale", 1.0), f"{where}.residual_scale", 0,
                                                  strict=True),
                      noise_std=check_number(_given(data, "noise_scale", 0.0), f"{where}.noise_scale", 0))


def _given(data: dict[str, Any], key: str, default: float) -> Any:
    """``data[key]``, or ``default`` when absent or null (as mergekit reads it); a given 0 stays 0."""
    value = data.get(key)
    return default if value is None else value


def from_mergekit(data: dict[str, Any]) -> MergeConfig:
    """Translate a mergekit-moe config; refuse what upcycle cannot honour, naming the option and why."""
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown mergekit-moe key(s): {', '.join(unknown)}; mergekit-moe 0.1.5 knows "
                          f"{', '.join(sorted(TOP_KEYS))}")
    if "base_model" not in data:
        raise RecipeError("base_model: mergekit-moe configs name the model that gives attention, embeddings and norms")
    gate_mode = data.get("gate_mode", "hidden")
    if gate_mode == "hidden_last":
        raise RecipeError("gate_mode hidden_last is not supported: upcycle's hidden gates average every prompt token "
                          "at each layer's FFN input; use gate_mode hidden")
    if gate_mode not in GATE_MODES:
        raise RecipeError(f"gate_mode {gate_mode!r} is not a mergekit-moe gate mode; use one of "
                          f"{', '.join(sorted(GATE_MODES))}")
    router_init, router_std = GATE_MODES[gate_mode]
    dtype = data.get("dtype")
    if dtype is not None and str(dtype).removeprefix("torch.") not in DTYPES:
        raise RecipeError(f"dtype {dtype!r}: upcycle writes bfloat16, float16 or float32")
    architecture = data.get("architecture")
    if architecture is not None and architecture not in ARCHITECTURES:
        why = ("upcycle has no DeepSeek-style output" if architecture == "deepseek"
               else f"it is not a mergekit-moe architecture")
        raise RecipeError(f"architecture {architecture!r} is not supported ({why}); use one of "
                          f"{', '.join(sorted(ARCHITECTURES))} or leave it out (upcycle picks the target)")
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise RecipeError("experts: list at least one expert with 'source_model'")
    shared = data.get("shared_experts") or []
    if not isinstance(shared, list) or len(shared) > 1:
        raise RecipeError("shared_experts: upcycle's targets hold at most one shared expert; list one")
    base, base_revision = _reference(data["base_model"], "base_model")
    notes = []
    shared_expert = _expert(shared[0], "shared_experts[0]", gate_mode) if shared else None
    if shared_expert is not None and (shared_expert.prompts or shared_expert.negative_prompts):
        notes.append("shared_experts[0]: prompts ignored: upcycle's shared expert is always on at full weight")
    parsed = tuple(_expert(e, f"experts[{i}]", gate_mode) for i, e in enumerate(experts))
    top_k = data.get("experts_per_token", 2)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(parsed):
        raise RecipeError(f"experts_per_token must be between 1 and the number of experts ({len(parsed)}), "
                          f"got {top_k!r}")
    for index, expert in enumerate(parsed):
        if router_init in ("hidden", "embed") and not expert.prompts:
            raise RecipeError(f"experts[{index}] ({expert.source}) has no positive_prompts, and gate_mode {gate_mode} "
                              "builds its gate from them: add positive_prompts, or use gate_mode random")
    config = MergeConfig(
        experts=parsed,
        base_model=base, base_revision=base_revision, shared_weights="base",
        top_k=top_k, router_init=router_init,
        router_std=router_std if router_std is not None else MergeConfig.router_std,
        target=ARCHITECTURES.get(architecture, "auto"),
        dtype=DTYPES[str(dtype).removeprefix("torch.")] if dtype is not None else "auto",
        shared_expert=shared_expert, format="mergekit", notes=tuple(notes))
    return config.validate()
