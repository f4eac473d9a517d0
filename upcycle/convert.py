"""The conversion pipeline: open the dense source, plan, stream the MoE into an atomic output folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .calibration import calibration_tokenizer, collect_statistics, tokenize_calibration
from .card import check_base_model, render_card, resolve_base_model, source_license
from .checkpoint import CARD_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, library_versions, write_recipe
from .errors import RecipeError, VerificationError
from .hub_push import check_can_push
from .io import open_source
from .io.atomic import atomic_folder, check_free_space, check_output
from .io.config_check import check_required_tensors
from .io.public_names import public_name, public_recipe
from .layer_data import LayerData
from .plan import make_plan
from .recipe import Recipe, parse_size
from .runner import resolve_device, resolve_dtype
from .tensors import SourceCache
from .verify import verify as run_verify
from .writing import push_output, write_weights

VERIFY_NEW_TOKENS = 0  # logits only: generation would triple the cost and adds little to max |Δlogit|


@dataclass
class ConversionResult:
    """What a conversion did (or, with ``dry_run``, would do)."""

    output: Optional[Path]
    summary: dict[str, Any]
    recipe: Recipe
    files: list[str]
    dry_run: bool = False
    #: measured at conversion time (``upcycle.verify``, streamed layer by layer), or ``{"skipped": reason}``
    verification: Optional[dict[str, Any]] = None
    #: where ``push_to_hub`` sent the output (an ``upcycle.hub_push.PushResult``)
    pushed: Any = None


def build_recipe(recipe: Recipe | str | Path | dict | None = None, **overrides: Any) -> Recipe:
    """Merge a recipe (object, file or mapping) with flat keyword overrides (``granularity=4``); overrides win.
    The result is validated once, when it is made."""
    if recipe is None:
        base = Recipe()
    elif isinstance(recipe, Recipe):
        base = recipe
    elif isinstance(recipe, dict):
        base = Recipe.from_dict(recipe)
    else:
        base = Recipe.load(recipe)
    unknown = sorted(set(overrides) - set(Recipe.keys()))
    if unknown:
        raise RecipeError(f"unknown option(s): {', '.join(unknown)}")
    return base.replace(**overrides) if any(v is not None for v in overrides.values()) else base


def convert(source: str | Path, output: str | Path, recipe: Recipe | str | Path | dict | None = None, *,
            force: bool = False, dry_run: bool = False, quiet: bool = False, verify: Optional[bool] = None,
            push_to_hub: Optional[str] = None, hub_private: bool = False, hub_token: Optional[str] = None,
            base_model: Optional[str] = None, device: str = "cpu", compute_dtype: str = "float32",
            **overrides: Any) -> ConversionResult:
    """Convert a dense checkpoint into an MoE checkpoint.

    ``source`` is a local folder, a ``.gguf`` file or a Hub repo id; ``recipe`` a :class:`Recipe`, a
    recipe file or a mapping, and keyword arguments (``num_experts=8``, ``top_k=2``, ...) override it.
    The output appears under ``output`` only once complete. ``verify`` (default on; False skips it)
    compares the finished MoE with the dense model, one layer at a time so any size fits, before it is
    moved into place; an exact recipe that fails, or any NaN/inf, raises :class:`VerificationError` and
    writes nothing. ``device`` and ``compute_dtype`` are where and in what precision calibration and
    that check run (cpu, float32: the recorded numbers are then the same on every run).
    ``push_to_hub`` then uploads it to that Hub repo (see :func:`upcycle.hub_push.push`).
    ``base_model`` is the dense model's Hub repo id for the card; by default it is derived from the source
    (a Hub id, a Hugging Face cache snapshot folder, or a ``_name_or_path`` repo id in its config).
    """
    recipe = build_recipe(recipe, **overrides)
    output = Path(output)
    if base_model:
        check_base_model(base_model)
    if push_to_hub and not dry_run:
        hub_token = check_can_push(push_to_hub, hub_token)
    if not dry_run:
        check_output(output, force)

    resolve_dtype(compute_dtype)
    resolve_device(device)
    src = open_source(str(source), recipe.revision, quiet=quiet, headers_only=dry_run)
    if not dry_run:
        check_output(output, force, getattr(src, "file", src.folder))
    config = src.load_config()
    if recipe.num_experts > MANY_EXPERTS:  # refused for lack of space before the big plan is made
        estimate = estimate_summary(config, src.infos, recipe)
        check_free_space(output, estimate["output_bytes"])
        if dry_run:  # planning every expert takes memory and time linear in their count: report the estimate
            check_required_tensors(config, src.infos, src.spec)
            _calibration_ids(src, recipe)
            return ConversionResult(None, estimate, recipe, [], dry_run=True)
    plan = make_plan(config, src.infos, recipe)
    check_required_tensors(config, src.infos, src.spec)  # after make_plan: an unknown family is reported first
    calibration_ids = _calibration_ids(src, recipe)
    summary = plan.summary()
    if dry_run:
        check_free_space(output, summary["output_bytes"])  # what the real run would refuse on this disk
        return ConversionResult(None, summary, recipe, [], dry_run=True)
    if recipe.needs_layer_data:
        plan = make_plan(config, src.infos, recipe, data=_layer_data(src, plan, calibration_ids, quiet, device,
                                                                     compute_dtype))

    with atomic_folder(output, force, need_bytes=summary["output_bytes"]) as tmp:
        files = write_weights(tmp, plan, src, quiet)
        checking = {"verify": verify, "device": device, "dtype": compute_dtype}
        meta, verification = _write_metadata(tmp, plan, src, config, summary, checking, quiet, push_to_hub,
                                             base_model)
        files += meta
    result = ConversionResult(output, summary, recipe, sorted(files), verification=verification)
    if push_to_hub:
        result.pushed = push_output(output, push_to_hub, hub_private, hub_token, quiet)
    return result


#: above this many experts, the output size is worked out from two small plans before the real one is made
MANY_EXPERTS = 256


#: summary fields that grow by the same amount with each expert (or virtual group of experts)
_PER_EXPERT_FIELDS = ("total_params", "active_params", "output_bytes")  # active: the router rows


def estimate_summary(config: Any, infos: dict, recipe: Recipe) -> dict[str, Any]:
    """``plan.summary()`` of ``recipe`` without planning all its experts: every expert (one virtual group
    of them for ``split``) adds the same router rows and expert tensors, so the parameter counts (router
    rows are active parameters too) and bytes are affine in the expert count, and two plans with the fewest
    experts the recipe allows give them (to within the few header bytes that longer expert numbers take; the
    shard count as a lower bound).
    Planning memory and time grow with the expert count; this lets a huge ``--num-experts`` be refused
    for lack of space, or shown by ``--dry-run``, in bounded time and memory. ``estimated`` is set when
    the figures were extrapolated."""
    group = getattr(recipe.method_options, "routed_group_size", 1)
    first = max(group, -(-recipe.top_k // group) * group)
    if recipe.num_experts <= first + group:
        return make_plan(config, infos, recipe).summary()
    small, larger = (make_plan(config, infos, recipe.replace(num_experts=n)).summary() for n in (first, first + group))
    steps = (recipe.num_experts - first) // group
    summary = {**small, "num_experts": recipe.num_experts, "estimated": True}
    for key in _PER_EXPERT_FIELDS:
        summary[key] = small[key] + (larger[key] - small[key]) * steps
    limit = parse_size(recipe.max_shard_size)
    summary["shards"] = max(small["shards"], -(-summary["output_bytes"] // limit))  # at least this many
    return summary


def _calibration_ids(src, recipe: Recipe):
    """Tokenized ``--calibration`` text when the recipe needs it (checked in dry runs too), else None."""
    if not recipe.calibration_reasons():
        return None
    return tokenize_calibration(recipe.calibration, calibration_tokenizer(src), recipe.calibration_tokens,
                                recipe.num_experts)


def _layer_data(src, plan, calibration_ids, quiet: bool, device: str = "cpu", dtype: str = "float32"):
    """``layer -> LayerData``: dense matrices read on demand plus the calibration statistics."""
    stats = None
    if calibration_ids is not None:
        stats = collect_statistics(src, plan, calibration_ids, quiet=quiet, device=device, dtype=dtype,
                                   want_hidden=plan.recipe.wants_hidden_states,
                                   want_activations=plan.recipe.wants_activations)

    cache = SourceCache(src.read, views=plan.source_views)

    def data(layer: int) -> LayerData:
        if stats is None:
            return LayerData.from_cache(plan.family, layer, cache)
        sketch, energy = stats.activations(layer)
        return LayerData.from_cache(plan.family, layer, cache, activation_sketch=sketch, activation_energy=energy,
                                    hidden_centroids=stats.hidden_centroids(layer))

    return data


def _write_metadata(folder: Path, plan, src, config, summary: dict[str, Any], checking: dict[str, Any],
                    quiet: bool, repo_id: Optional[str],
                    base_model: Optional[str] = None) -> tuple[list[str], Optional[dict[str, Any]]]:
    target_config = plan.target.build_config(plan)
    target_config.save_pretrained(folder)
    written = [CONFIG_FILE] + plan.target.write_extra_files(folder, plan)
    generation = src.generation_config(config)
    generation.save_pretrained(folder)
    written.append(GENERATION_CONFIG_FILE)
    written += src.save_tokenizer(folder)
    base_model = resolve_base_model(base_model, src.repo_id, src.folder)
    provenance = {"source": public_name(src.spec, src.repo_id or base_model),
                  "source_commit": src.commit, "base_model": base_model, "versions": library_versions(), **summary}
    recipe_dict = public_recipe(plan.recipe.to_dict())
    written.append(write_recipe(folder, recipe_dict, provenance))
    verification = _verify_output(folder, src, summary, quiet, **checking)
    if verification is not None:
        provenance["verification"] = verification
        write_recipe(folder, recipe_dict, provenance)
    licence = source_license(src.folder)
    if plan.dense_config.get("license") and "license" not in licence:
        licence["license"] = plan.dense_config["license"]
    remote_code = bool(json.loads((folder / CONFIG_FILE).read_text()).get("auto_map"))
    render_card(summary, recipe_dict, base_model, verification=verification, license_info=licence,
                remote_code=remote_code, repo_id=repo_id).save(folder / CARD_FILE)
    written.append(CARD_FILE)
    return written, verification


def _verify_output(folder: Path, src, summary: dict[str, Any], quiet: bool, verify: Optional[bool] = None,
                   device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Compare the finished MoE in ``folder`` with the dense source, streamed one layer at a time.

    Runs unless ``verify`` is False. An exact recipe whose logits differ, or any NaN/inf, raises
    :class:`VerificationError`, so nothing is written.
    """
    if verify is False:
        return {"skipped": "disabled with --no-verify"}

    dense = str(src.folder) if src.repo_id else src.spec
    # One thread: float reductions then run in a fixed order, so the numbers written into the card and
    # the recipe (and so the files) are the same on every run with the same inputs and seed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_verify(dense, folder, max_new_tokens=VERIFY_NEW_TOKENS, dtype=dtype, device=device, quiet=quiet)
    finally:
        torch.set_num_threads(threads)
    # verify rounds the dense weights to the dtype the output stores them in before comparing
    result = {k: _rounded(v) for k, v in report.to_dict().items() if k not in ("per_prompt", "per_layer")}
    result["per_layer_max_abs_diff"] = [_rounded(layer["max_abs_diff"]) for layer in report.per_layer]
    result["dense_rounded_to"] = summary["dtype"]
    if not report.finite:
        raise VerificationError(f"the converted MoE computes NaN or inf (first after layer "
                                f"{report.first_broken_layer}); nothing was written. This is a bug in upcycle: "
                                "please report it with the recipe")
    if not report.passed:
        raise VerificationError(f"the converted MoE claims exactness but its logits differ from the dense model by "
                                f"{report.max_abs_logit_diff:.3g} (> {report.atol:g}, first after layer "
                                f"{report.first_broken_layer}); nothing was written. "
                                "This is a bug in upcycle: please report it with the recipe")
    return result


def _rounded(value: Any) -> Any:
    """Floats to 3 significant digits, so the recorded numbers do not carry the last bits of the arithmetic."""
    return float(f"{value:.3g}") if isinstance(value, float) else value
