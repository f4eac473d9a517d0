"""``upcycle.merge``: experts from several fine-tunes of one base, streamed into one MoE checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..calibration import calibration_tokenizer
from ..errors import RecipeError
from ..families import family_for_model_type
from ..hub_push import check_can_push
from ..io.atomic import atomic_folder, check_output
from ..writing import push_output, write_weights
from .config import MergeConfig
from .fidelity import measure_fidelity
from .loading import load_config
from .planning import plan_merge, summary as merge_summary, with_router_rows
from .record import write_model_files, write_record
from .routers import domain_rows, embed_rows, embedding_key, hidden_rows, uniform_rows
from .sources import MergedSource, check_compatible, open_checked, source_id


@dataclass
class MergeResult:
    """What a merge did (or, with ``dry_run``, would do)."""

    output: Optional[Path]
    summary: dict[str, Any]
    config: Any
    files: list[str]
    dry_run: bool = False
    #: per-source fidelity, routing specificity, or ``{"skipped": reason}``
    verification: Optional[dict[str, Any]] = None
    pushed: Any = None


def _with_overrides(config: Any, overrides: dict[str, Any]):
    cfg = load_config(config)
    names = {f.name for f in dataclasses.fields(MergeConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise RecipeError(f"unknown merge option(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None}).validate()


def open_sources(cfg, quiet: bool, headers_only: bool):
    """The checked :class:`MergedSource` and ``source spec -> id``: every source is opened (headers only in a
    dry run) and compared with the base before any tensor is read."""
    base = open_checked(cfg.base, cfg.base_revision, "base_model", quiet, headers_only)
    base_config = base.load_config()
    base_dict = base_config.to_dict() if hasattr(base_config, "to_dict") else dict(base_config)
    family = family_for_model_type(base_dict.get("model_type", ""))
    where = {e.source: (f"experts[{i}].source", e.revision) for i, e in reversed(list(enumerate(cfg.experts)))}
    if cfg.shared_expert is not None:
        where.setdefault(cfg.shared_expert.source, ("shared_expert.source", cfg.shared_expert.revision))
    ids, sources = {}, {}
    for index, spec in enumerate(cfg.sources):
        label, revision = where[spec]
        same_as_base = spec == cfg.base and revision == cfg.base_revision
        source = base if same_as_base else open_checked(spec, revision, label, quiet, headers_only)
        if not same_as_base:
            check_compatible(base, base_dict, source, label)
        ids[spec] = source_id(index)
        sources[ids[spec]] = source
    average = None
    if cfg.shared_weights == "average":
        average = list(sources.values()) + ([base] if cfg.base_model and cfg.base not in ids else [])
    return MergedSource(base, sources, family, average), base_config, ids


def merge(config: Any, output: str | Path, *, force: bool = False, dry_run: bool = False, quiet: bool = False,
          verify: Optional[bool] = None, push_to_hub: Optional[str] = None, hub_private: bool = False,
          hub_token: Optional[str] = None, **overrides: Any) -> MergeResult:
    """Merge several fine-tunes of one base into an MoE at ``output``.

    ``config`` is a :class:`MergeConfig`, a mapping or a YAML/JSON file, in upcycle's format or
    mergekit-moe's; keyword arguments (``target``, ``dtype``, ``seed``, ``top_k``, ...) override it;
    ``card_base_model`` (one Hub id or a list, the CLI's ``--base-model``) gives the card's ``base_model`` ids in
    place of those derived from the sources (``base_model`` is the base source, as in the config). Expert e
    holds source e's FFN; the other weights are the base's (or their average). ``verify`` (None or True: on;
    layer-streamed, so at any size) measures each source's deviation with every token sent to its expert and
    the routing specificity of the prompts, before the output is moved into place.
    """
    cfg = _with_overrides(config, overrides)
    output = Path(output)
    if push_to_hub and not dry_run:
        hub_token = check_can_push(push_to_hub, hub_token)
    if not dry_run:
        check_output(output, force)
    merged, base_config, ids = open_sources(cfg, quiet, headers_only=dry_run)
    if not dry_run:
        for source in [merged.base, *merged.sources.values()]:
            check_output(output, force, getattr(source, "file", source.folder))
    plan = plan_merge(cfg, base_config, merged.infos, ids)
    summary = merge_summary(plan, cfg, cfg.sources)
    if dry_run:
        return MergeResult(None, summary, cfg, [], dry_run=True)
    plan = _with_routers(plan, cfg, merged, base_config)

    with atomic_folder(output, force) as tmp:
        files = write_weights(tmp, plan, merged, quiet)
        files += write_model_files(tmp, plan, merged, base_config)
        verification = measure_fidelity(tmp, cfg, merged, ids, plan, summary, verify, quiet)
        files += write_record(tmp, plan, cfg, merged, summary, verification, push_to_hub)
    result = MergeResult(output, summary, cfg, sorted(files), verification=verification)
    if push_to_hub:
        result.pushed = push_output(output, push_to_hub, hub_private, hub_token, quiet)
    return result


def _with_routers(plan, cfg, merged, base_config):
    """The plan with router rows from prompts, domain text or the uniform init (normal/zeros: as planned)."""
    init, layers = cfg.router_init, plan.moe_layers
    if init in ("normal", "zeros"):
        return plan
    if init == "uniform":
        return with_router_rows(plan, uniform_rows(cfg, plan.hidden_size, layers))
    tokenizer = calibration_tokenizer(merged.base)
    if init == "hidden":
        rows = hidden_rows(cfg, merged.base, plan.family, layers, tokenizer)
    elif init == "domain":
        rows = domain_rows(cfg, merged.base, plan.family, layers, tokenizer,
                           plan.family.max_positions(plan.dense_config))
    else:
        key = embedding_key(plan.dense_config, merged.infos, plan.hidden_size)
        rows = embed_rows(cfg, merged.read, key, layers, tokenizer)
    return with_router_rows(plan, rows)
