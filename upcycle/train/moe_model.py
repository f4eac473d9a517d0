"""What training needs to know about an MoE model: experts, top-k, routers, parameter groups."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..checkpoint import expert_count, experts_per_token
from ..errors import RecipeError, UnsupportedArchitectureError

TRAIN_GROUPS = ("experts", "routers", "attention", "embeddings", "norms", "all")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def moe_shape(config: Any, path: str = "model") -> tuple[int, int]:
    """``(num_experts, top_k)`` of an MoE config; a dense config is refused with the fix."""
    experts, top_k = expert_count(config), experts_per_token(config)
    if not experts or experts < 2 or not top_k:
        raise UnsupportedArchitectureError(
            f"{path} is a dense model ({getattr(config, 'model_type', '?')}), not a Mixture-of-Experts; "
            f"run `upcycle convert {path} MOE_FOLDER` first and train the MoE")
    return int(experts), int(top_k)


def load_moe_config(path: Path) -> tuple[Any, int, int]:
    """The transformers config of the MoE folder ``path``, its expert count and top-k (a dense model refused)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return (config, *moe_shape(config, str(path)))


def text_attr(config: Any, name: str) -> Any:
    """A language-model setting, read from the config or its text sub-config (composite configs)."""
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def check_seq_len(config: Any, seq_len: int) -> None:
    """Refuse sequences longer than the model's position range."""
    limit = text_attr(config, "max_position_embeddings")
    if seq_len < 2:
        raise RecipeError(f"--seq-len must be at least 2, got {seq_len}")
    if limit and seq_len > limit:
        raise RecipeError(f"--seq-len {seq_len} is larger than the model supports (max_position_embeddings "
                          f"= {limit}); use --seq-len {limit} or less")


def router_modules(model: Any, num_experts: int) -> list[tuple[str, Any]]:
    """``(name, module)`` of every router, in forward order.

    Native transformers MoE classes declare their router class for ``output_router_logits``; other models
    are searched for ``gate``/``router`` modules whose weight has one row per expert.
    """
    recorder = getattr(model, "_can_record_outputs", None) or {}
    recorded = recorder.get("router_logits")
    target = getattr(recorded, "target_class", recorded if isinstance(recorded, type) else None)
    found = []
    for name, module in model.named_modules():
        if target is not None:
            if isinstance(module, target):
                found.append((name, module))
            continue
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in ("gate", "router") and getattr(weight, "ndim", 0) == 2 \
                and weight.shape[0] == num_experts:
            found.append((name, module))
    return found


def router_layers(model: Any, num_experts: int) -> list[int]:
    """Decoder-layer index of each router (its position when the name carries no ``layers.N``)."""
    layers = []
    for i, (name, _) in enumerate(router_modules(model, num_experts)):
        match = _LAYER.search(f".{name}.")
        layers.append(int(match.group(1)) if match else i)
    return layers


def parse_train_groups(spec: str) -> set[str]:
    """``experts,routers`` -> {"experts", "routers"}; unknown names are refused."""
    groups = {g.strip() for g in spec.split(",") if g.strip()}
    unknown = sorted(groups - set(TRAIN_GROUPS))
    if not groups or unknown:
        raise RecipeError(f"--train: unknown group(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(TRAIN_GROUPS)} (comma-separated)")
    return groups


def parameter_group(name: str, router_prefixes: tuple[str, ...]) -> str:
    """Which --train group a parameter belongs to ('other' when none)."""
    if router_prefixes and name.startswith(router_prefixes):
        return "routers"
    if ".experts." in name or name.rsplit(".", 1)[0].endswith(".experts") or "shared_expert" in name:
        return "experts"
    if "attn" in name or "attention" in name:
        return "attention"
    if "embed" in name or "lm_head" in name or ".wte." in name:
        return "embeddings"
    if "norm" in name:
        return "norms"
    return "other"


def freeze_except(model: Any, groups: set[str], num_experts: int) -> dict[str, int]:
    """Set ``requires_grad`` so that only ``groups`` train; return trainable/frozen parameter counts."""
    if "all" in groups:
        for p in model.parameters():
            p.requires_grad_(True)
        total = sum(p.numel() for p in model.parameters())
        return {"trainable": total, "frozen": 0}
    prefixes = tuple(f"{name}." for name, _ in router_modules(model, num_experts))
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        train = parameter_group(name, prefixes) in groups
        param.requires_grad_(train)
        counts["trainable" if train else "frozen"] += param.numel()
    if counts["trainable"] == 0:
        raise RecipeError(f"--train {','.join(sorted(groups))} selects no parameter of this model")
    return counts
