"""Describe an MoE checkpoint from its config and safetensors headers, without loading weights.

``upcycle.io`` and ``upcycle.targets`` are imported inside the functions: both import torch, which
``import upcycle.inspection`` does not (tests/test_checkpoint.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .checkpoint import (CONFIG_FILE, EXPERT_SIZE_KEYS, SINGLE_FILE, config_value, expert_count, experts_per_token,
                         model_folder, provenance_of, read_recipe, weight_files)
from .errors import SourceNotFoundError

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")  # model.layers.N., transformer.h.N. (GPT-2)
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")


def _weight_headers(folder: Path) -> dict[str, Any]:
    """Every tensor's header entry, read through the checks a conversion's source gets (index contained in
    the folder, headers valid, no tensor twice or in a shard the index does not name)."""
    from .io.folder import merge_shards
    from .io.safetensors_format import read_header

    weights = weight_files(folder)
    if weights is None:
        raise SourceNotFoundError(f"{folder}: no {SINGLE_FILE} or index; inspect reads safetensors checkpoints")
    missing = weights.missing(folder)
    if missing:
        raise SourceNotFoundError(f"{folder / weights.index} names shard(s) that are missing: {', '.join(missing)}")
    headers = {name: read_header(folder / name)[0] for name in weights.files}
    return merge_shards(folder / weights.index if weights.index else None, weights.weight_map or {}, headers)


def _count(value: Any) -> Any:
    """A positive integer from a config, else None (a broken config must not break the arithmetic)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _first_architecture(config: dict[str, Any]) -> Any:
    names = config.get("architectures")
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None


def _packed_pattern() -> re.Pattern[str]:
    """Packed-expert tensors of every registered target (e.g. GraniteMoE's ``input_linear [E, 2F, H]``)."""
    from .targets import all_targets

    templates = [t for target in all_targets().values() for t in getattr(target.layout, "packed", {})]
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

    folder = model_folder(path)
    config = read_config_json(folder / CONFIG_FILE)
    recipe = read_recipe(folder)
    num_experts = _count(expert_count(config))
    top_k = _count(experts_per_token(config))

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
    provenance = provenance_of(recipe)
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
        "expert_size": config_value(config, EXPERT_SIZE_KEYS),
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
