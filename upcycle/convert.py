"""The conversion pipeline: open the dense source, plan, stream the MoE into an atomic output folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import RecipeError
from .recipe import Recipe, parse_size

RECIPE_FILE = "upcycle_recipe.json"


@dataclass
class ConversionResult:
    """What a conversion did (or, with ``dry_run``, would do)."""

    output: Optional[Path]
    summary: dict[str, Any]
    recipe: Recipe
    files: list[str]
    dry_run: bool = False


def _versions() -> dict[str, str]:
    import huggingface_hub
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {"upcycle": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "huggingface_hub": huggingface_hub.__version__}


def build_recipe(recipe: Recipe | str | Path | dict | None = None, **overrides: Any) -> Recipe:
    """Merge a recipe (object, file or mapping) with keyword overrides; overrides win."""
    if recipe is None:
        base = Recipe()
    elif isinstance(recipe, Recipe):
        base = dataclasses.replace(recipe)
    elif isinstance(recipe, dict):
        base = Recipe.from_dict(recipe)
    else:
        base = Recipe.load(recipe)
    names = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise RecipeError(f"unknown option(s): {', '.join(unknown)}")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None}).validate()


def convert(source: str | Path, output: str | Path, recipe: Recipe | str | Path | dict | None = None, *,
            force: bool = False, dry_run: bool = False, quiet: bool = False, **overrides: Any) -> ConversionResult:
    """Convert a dense checkpoint into an MoE checkpoint.

    ``source`` is a local folder, a ``.gguf`` file or a Hub repo id; ``recipe`` a :class:`Recipe`, a
    recipe file or a mapping, and keyword arguments (``num_experts=8``, ``top_k=2``, ...) override it.
    The output appears under ``output`` only once complete.
    """
    from .io import open_source
    from .io.atomic import atomic_folder, check_output
    from .plan import make_plan

    recipe = build_recipe(recipe, **overrides)
    output = Path(output)
    if not dry_run:
        check_output(output, force)
    src = open_source(str(source), recipe.revision, quiet=quiet)
    if not dry_run:
        check_output(output, force, src.folder)
    config = src.load_config()
    plan = make_plan(config, src.infos, recipe)
    summary = plan.summary()
    if dry_run:
        return ConversionResult(None, summary, recipe, [], dry_run=True)

    with atomic_folder(output, force) as tmp:
        files = _write_weights(tmp, plan, src, quiet)
        files += _write_metadata(tmp, plan, src, config, summary)
    return ConversionResult(output, summary, recipe, sorted(files))


def _write_weights(folder: Path, plan, src, quiet: bool) -> list[str]:
    from tqdm.auto import tqdm

    from .io.writer import split_into_shards, write_shards
    from .plan import SourceCache

    by_name = {t.spec.name: t for t in plan.tensors}
    shards = split_into_shards([t.spec for t in plan.tensors], parse_size(plan.recipe.max_shard_size))
    cache = SourceCache(src.read)
    total = sum(t.spec.nbytes for t in plan.tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing experts", disable=quiet) as bar:
        names = write_shards(folder, shards, lambda spec: by_name[spec.name].make(cache), bar.update)
    return names + (["model.safetensors.index.json"] if len(names) > 1 else [])


def _write_metadata(folder: Path, plan, src, config, summary: dict[str, Any]) -> list[str]:
    from .card import render_card
    from .plan import build_target_config

    target_config = build_target_config(plan)
    target_config.save_pretrained(folder)
    written = ["config.json"]
    if plan.target.extra_files is not None:
        written += plan.target.extra_files(folder, plan)
    generation = src.generation_config(config)
    generation.save_pretrained(folder)
    written.append("generation_config.json")
    written += src.save_tokenizer(folder)
    provenance = {"source": src.spec, "source_commit": src.commit, "versions": _versions(), **summary}
    recipe_dict = plan.recipe.to_dict()
    (folder / RECIPE_FILE).write_text(json.dumps({**recipe_dict, "upcycle": provenance}, indent=2) + "\n")
    written.append(RECIPE_FILE)
    base_model = src.repo_id
    render_card(summary, recipe_dict, base_model, plan.dense_config.get("license")).save(folder / "README.md")
    written.append("README.md")
    return written
