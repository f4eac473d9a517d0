"""Describe an MoE checkpoint from its config and safetensors headers, without loading weights."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .errors import CorruptCheckpointError, SourceNotFoundError

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")  # model.layers.N., transformer.h.N. (GPT-2)
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_EXPERT_SIZE_KEYS = ("moe_intermediate_size", "intermediate_size")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk")  # mixtral/qwen, ernie4_5_moe, hunyuan_v1_moe


def _top_k(config: dict[str, Any]) -> Any:
    value = next((config[k] for k in _TOP_K_KEYS if config.get(k)), None)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value) and len(set(value)) == 1:  # per-layer list with one value
        value = value[0]
    return value


def _weight_headers(folder: Path) -> dict[str, Any]:
    """Every tensor's header entry, read through the same checks as a conversion's source (index contained
    in the folder, headers valid, no tensor twice)."""
    from .io.folder import INDEX, index_shards, inside_folder, merge_shards, read_index
    from .io.safetensors_format import read_header

    if (folder / INDEX).is_file():
        shards = index_shards(folder, INDEX)
        return merge_shards(folder / INDEX, read_index(folder, INDEX),
                            {name: read_header(path)[0] for name, path in shards.items()})
    if (folder / "model.safetensors").is_file():
        return read_header(inside_folder(folder, "model.safetensors", str(folder)))[0]
    raise SourceNotFoundError(f"{folder}: no model.safetensors or index; inspect reads safetensors checkpoints")


def _first_architecture(config: dict[str, Any]) -> Optional[str]:
    names = config.get("architectures")
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None


def _count(value: Any) -> Any:
    """A positive integer from a config, else None (a broken config must not break the arithmetic)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _read_recipe(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(recipe, dict):
        raise CorruptCheckpointError(f"{path}: must hold a JSON object")
    if not isinstance(recipe.get("upcycle", {}), dict):
        raise CorruptCheckpointError(f"{path}: 'upcycle' must be an object")
    return recipe


def _packed_pattern() -> re.Pattern[str]:
    """Packed-expert tensors of every registered target (e.g. GraniteMoE's ``input_linear [E, 2F, H]``)."""
    from .targets import all_targets

    templates = [t for target in all_targets().values() for t in (target.packed_experts or {})]
    alternatives = [re.escape(t).replace(re.escape("{i}"), r"\d+") for t in templates]
    return re.compile("|".join(alternatives) or "(?!)")


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The dense config nested in a bundled ``upcycle_moe`` config (empty for other models)."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else {}


def inspect(path: str | Path) -> dict[str, Any]:
    """Family, target, MoE layers, experts, top-k, parameter counts, bytes on disk and recipe of a checkpoint."""
    from .io.config_check import read_config_json
    from .io.safetensors_format import numel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise SourceNotFoundError(f"{path}: not a model folder (no config.json)")
    config = read_config_json(folder / "config.json")
    recipe = _read_recipe(folder / "upcycle_recipe.json")
    num_experts = _count(next((config[k] for k in _EXPERT_COUNT_KEYS if config.get(k)), None))
    top_k = _count(_top_k(config))

    total, routed, packed = 0, {}, _packed_pattern()
    for name, info in _weight_headers(folder).items():
        n = numel(info.shape)
        total += n
        layer = _LAYER.search(name)
        if layer and (_EXPERT.search(name) or _FUSED.search(name) or packed.fullmatch(name)):
            routed[int(layer.group(1))] = routed.get(int(layer.group(1)), 0) + n
    active = total
    if num_experts and top_k:
        active = total - sum(routed.values()) + sum(n * top_k // num_experts for n in routed.values())
    provenance = (recipe or {}).get("upcycle", {})
    report = {
        "path": str(folder),
        "model_type": config.get("model_type"),
        "architecture": _first_architecture(config),
        "family": provenance.get("family"),
        "source": provenance.get("source"),
        "num_layers": config.get("num_hidden_layers") or _text_config(config).get("num_hidden_layers")
        or _text_config(config).get("n_layer"),
        "moe_layers": sorted(routed),
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_size": next((config[k] for k in _EXPERT_SIZE_KEYS if config.get(k)), None),
        "total_params": total,
        "active_params": active,
        "bytes_on_disk": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "exact": provenance.get("exact"),
        "recipe": {k: v for k, v in recipe.items() if k != "upcycle"} if recipe else None,
    }
    if recipe and recipe.get("method") in ("replicate", "split") and not recipe.get("noise_std"):
        report["note"] = ("experts are identical copies (split: copies of the same FFN shards): the language-model "
                          "loss gives the router no gradient at first; fine-tune with a load-balancing loss (or use "
                          "--noise-std, --method drop, or a kmeans router) to let experts specialise")
    return report
