"""Checks of the expert-method options that need no model: run before any weight or text is read."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import RecipeError
from .layers import check_layer_spec

if TYPE_CHECKING:  # pragma: no cover
    from .recipe import Recipe


def needs_calibration(recipe: "Recipe") -> list[str]:
    """The recipe options that read ``--calibration`` data (empty when none does)."""
    from .partitions import get_partition
    from .routers import get_router_init

    reasons = []
    if recipe.method == "split" and get_partition(recipe.split_strategy).needs_calibration:
        reasons.append(f"--split-strategy {recipe.split_strategy}")
    if get_router_init(recipe.router_init).needs_calibration:
        reasons.append(f"--router-init {recipe.router_init}")
    return reasons


def _positive_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecipeError(f"--{name} must be an integer >= {minimum}, got {value!r}")


def check_method_options(recipe: "Recipe") -> None:
    """Raise :class:`RecipeError` for option values or combinations no model can satisfy."""
    from .partitions import get_partition
    from .routers import get_router_init

    _positive_int("granularity", recipe.granularity, 1)
    _positive_int("shared-experts", recipe.shared_experts, 0)
    _positive_int("calibration-tokens", recipe.calibration_tokens, 1)
    get_partition(recipe.split_strategy)
    if not 0.0 <= float(recipe.drop_ratio) <= 1.0:
        raise RecipeError(f"--drop-ratio must be between 0 and 1, got {recipe.drop_ratio}")
    if float(recipe.noise_std) < 0:
        raise RecipeError(f"--noise-std must be >= 0, got {recipe.noise_std}")
    recipe.layers = check_layer_spec(recipe.layers)

    if recipe.method != "split" and (recipe.granularity != 1 or recipe.shared_experts):
        raise RecipeError(f"--granularity and --shared-experts need --method split (got --method {recipe.method})")
    if recipe.method == "split":
        _check_split(recipe)
    reasons = needs_calibration(recipe)
    if reasons and not recipe.calibration:
        raise RecipeError(f"{' and '.join(reasons)} need(s) calibration text: pass --calibration PATH "
                          "(a .txt file, a .jsonl file with a 'text' field, or a folder of them)")
    router = get_router_init(recipe.router_init)
    if router.per_expert and recipe.method == "split" and recipe.routed_group_size > 1 and not recipe.allow_inexact:
        raise RecipeError(f"--router-init {recipe.router_init} gives each expert its own router row, which breaks "
                          "the exact virtual-group split (experts of a group must share a row); use virtual-group, "
                          "normal, zeros or kmeans, or pass --allow-inexact")


def _check_split(recipe: "Recipe") -> None:
    g, s = recipe.granularity, recipe.shared_experts
    if s >= g:
        raise RecipeError(f"--shared-experts {s} must be smaller than --granularity {g}: the FFN is cut into {g} "
                          f"segments, {s} of them shared, and at least one must stay routed")
    group = recipe.routed_group_size
    what = f"the routed segments per virtual group (granularity {g}" + (f" - {s} shared" if s else "") + f" = {group})"
    if recipe.num_experts % group:
        raise RecipeError(f"--num-experts {recipe.num_experts} must be a multiple of {what}; "
                          f"e.g. {group * max(1, recipe.num_experts // group)}")
    if recipe.top_k % group and not recipe.allow_inexact:
        raise RecipeError(f"--top-k {recipe.top_k} must be a multiple of {what} for the split to be exact (top-k "
                          f"then picks whole virtual groups); use --top-k {group * max(1, recipe.top_k // group)}, "
                          "or pass --allow-inexact to accept a model that deviates from the dense one")
