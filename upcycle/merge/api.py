"""``upcycle.merge``: experts from several fine-tunes of one base, streamed into one MoE checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import RecipeError


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
    from .config import MergeConfig
    from .loading import load_config

    cfg = load_config(config)
    names = {f.name for f in dataclasses.fields(MergeConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise RecipeError(f"unknown merge option(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None}).validate()


def open_sources(cfg, quiet: bool, headers_only: bool):
    """The checked :class:`MergedSource` and ``source spec -> id``: every source is opened (headers only in a
    dry run) and compared with the base before any tensor is read."""
    from ..families import family_for_model_type
    from .sources import MergedSource, check_compatible, open_checked, source_id

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
    mergekit-moe's; keyword arguments (``target``, ``dtype``, ``seed``, ``top_k``, ...) override it. Expert e
    holds source e's FFN; the other weights are the base's (or their average). ``verify`` (None: when it
    fits in half the free RAM) measures each source's deviation with every token sent to its expert and
    the routing specificity of the prompts, before the output is moved into place.
    """
    from ..io.atomic import atomic_folder, check_output
    from .planning import plan_merge, summary as merge_summary

    cfg = _with_overrides(config, overrides)
    output = Path(output)
    if push_to_hub and not dry_run:
        from ..hub_push import check_can_push

        hub_token = check_can_push(push_to_hub, hub_token)
    if not dry_run:
        check_output(output, force)
    merged, base_config, ids = open_sources(cfg, quiet, headers_only=dry_run)
    if not dry_run:
        for source in [merged.base, *merged.sources.values()]:
            check_output(output, force, source.folder)
    plan = plan_merge(cfg, base_config, merged.infos, ids)
    summary = merge_summary(plan, cfg, cfg.sources)
    if dry_run:
        return MergeResult(None, summary, cfg, [], dry_run=True)
    plan = _with_routers(plan, cfg, merged, base_config)

    from ..convert import _write_weights

    with atomic_folder(output, force) as tmp:
        files = _write_weights(tmp, plan, merged, quiet)
        files += _write_model_files(tmp, plan, merged, base_config)
        verification = _verify(tmp, cfg, merged, ids, plan, summary, verify, quiet)
        files += _write_record(tmp, plan, cfg, merged, summary, verification, push_to_hub)
    result = MergeResult(output, summary, cfg, sorted(files), verification=verification)
    if push_to_hub:
        from ..convert import _push

        result.pushed = _push(output, push_to_hub, hub_private, hub_token, quiet)
    return result


def _with_routers(plan, cfg, merged, base_config):
    """The plan with router rows from prompts, domain text or the uniform init (normal/zeros: as planned)."""
    from ..calibration import calibration_tokenizer
    from .planning import with_router_rows
    from .routers import domain_rows, embed_rows, embedding_key, hidden_rows, uniform_rows

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


def _dense_spec(source) -> str:
    return str(source.folder) if source.repo_id else source.spec


def _verify(folder: Path, cfg, merged, ids: dict[str, str], plan, summary: dict[str, Any], verify: Optional[bool],
            quiet: bool) -> dict[str, Any]:
    """Fidelity per source (every token sent to its expert) and routing specificity, measured on ``folder``.

    Exact claims are checked: a source that differs from the base only in its FFN must be reproduced
    (else :class:`VerificationError`, nothing written).
    """
    import torch

    from ..convert import _free_memory
    from ..errors import VerificationError
    from ..verify import verify as run_verify
    from .compare import compare_sources

    if verify is False:
        return {"skipped": "disabled with --no-verify"}
    need, free = summary["total_params"] * 4, _free_memory()
    if verify is None and free is not None and need > free // 2:
        return {"skipped": f"the MoE needs ~{need / 1e9:.1f} GB of RAM at float32, {free / 1e9:.1f} GB free; "
                           "pass --verify to force it"}
    matches = compare_sources(merged)
    plain = all(e.residual_scale == 1.0 and not e.noise_std for e in cfg.experts) and cfg.shared_expert is None
    forced_exact = [plain and matches[ids[e.source]].shared_equal and plan.target.renormalises_top_k
                    for e in cfg.experts]
    identical = plain and all(m.shared_equal and m.ffn_equal for m in matches.values())
    summary["exact"] = identical
    _write_provenance(folder, plan, cfg, summary, {"forced_exact": forced_exact})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed reduction order: the same numbers on every run
    results: dict[str, Any] = {"sources": []}
    try:
        if identical:
            report = run_verify(_dense_spec(merged.base), folder, max_new_tokens=0, quiet=quiet)
            results["base"] = {k: float(f"{v:.3g}") if isinstance(v, float) else v
                               for k, v in report.to_dict().items() if k != "per_prompt"}
            if not report.passed:
                raise VerificationError(f"identical sources should give the base exactly, but the logits differ by "
                                        f"{report.max_abs_logit_diff:.3g}; nothing was written. This is a bug in "
                                        "upcycle: please report it with the config")
        seen: set[str] = set()
        for index, expert in enumerate(cfg.experts):
            if expert.source in seen:
                continue
            seen.add(expert.source)
            source = merged.sources[ids[expert.source]]
            report = run_verify(_dense_spec(source), folder, max_new_tokens=0, quiet=quiet, force_expert=index)
            results["sources"].append({"source": expert.source, "expert": index,
                                       "max_abs_logit_diff": float(f"{report.max_abs_logit_diff:.3g}"),
                                       "mean_kl": float(f"{report.mean_kl:.3g}"), "exact_expected": forced_exact[index]})
            if forced_exact[index] and not report.passed:
                raise VerificationError(f"{expert.source} differs from the base only in its FFN, yet with every token "
                                        f"sent to expert {index} the logits differ by {report.max_abs_logit_diff:.3g};"
                                        " nothing was written. This is a bug in upcycle: please report it")
        if all(e.prompts for e in cfg.experts):
            from .specificity import routing_specificity

            spec = routing_specificity(folder, [e.prompts for e in cfg.experts])
            results["specificity"] = {k: spec[k] for k in ("mean_top1", "mean_topk", "chance_top1", "top1")}
    finally:
        torch.set_num_threads(threads)
    return results


def _write_provenance(folder: Path, plan, cfg, summary: dict[str, Any], extra: dict[str, Any]) -> None:
    from ..checkpoint import library_versions, write_recipe

    provenance = {"source": cfg.base, "versions": library_versions(), **summary, "merge": {**cfg.to_dict(), **extra}}
    # flat keys say what was done (method merge, the merge's router init): `inspect` reads them
    write_recipe(folder, {**plan.recipe.to_dict(), "method": "merge", "router_init": cfg.router_init}, provenance)


def _write_model_files(folder: Path, plan, merged, base_config) -> list[str]:
    """config.json (and remote code), the base's generation config and tokenizer."""
    from ..checkpoint import CONFIG_FILE

    plan.target.build_config(plan).save_pretrained(folder)
    written = [CONFIG_FILE] + plan.target.write_extra_files(folder, plan)
    merged.generation_config(base_config).save_pretrained(folder)
    written.append("generation_config.json")
    return written + merged.save_tokenizer(folder)


def _write_record(folder: Path, plan, cfg, merged, summary: dict[str, Any], verification: dict[str, Any],
                  repo_id: Optional[str]) -> list[str]:
    """upcycle_recipe.json (the merge config under ``upcycle.merge``) and the model card listing every source."""
    from ..card import render_card, repo_id_from_cache_path, source_license
    from ..checkpoint import CARD_FILE, CONFIG_FILE, RECIPE_FILE, provenance_of, read_recipe

    forced = provenance_of(read_recipe(folder)).get("merge", {}).get("forced_exact")
    _write_provenance(folder, plan, cfg, {**summary, "verification": verification},
                      {"forced_exact": forced} if forced is not None else {})
    sources = [merged.base, *[s for s in merged.sources.values() if s is not merged.base]]
    # Hub ids only (a local folder has none, as in `convert`); every source is listed in the Experts section
    names = [n for n in (s.repo_id or repo_id_from_cache_path(s.folder) for s in sources) if n]
    remote = bool(json.loads((folder / CONFIG_FILE).read_text()).get("auto_map"))
    table = {"base_model": cfg.base, "shared_weights": cfg.shared_weights, "router_init": cfg.router_init,
             "top_k": cfg.top_k, "experts": [e.source for e in cfg.experts], "target": plan.target.name,
             "dtype": plan.dtype_name, "seed": cfg.seed}
    card = render_card(summary, table, list(dict.fromkeys(names)) or None, verification=_card_verification(verification),
                       license_info=source_license(merged.base.folder), remote_code=remote, repo_id=repo_id,
                       reproduce="`upcycle_recipe.json` in this repository records the merge config (under "
                                 "`upcycle.merge`), the sources and the library versions; `upcycle merge` with "
                                 "that config reproduces the model.")
    card.text += _card_merge_section(cfg, verification)
    card.save(folder / CARD_FILE)
    return [RECIPE_FILE, CARD_FILE]


def _card_merge_section(cfg, verification: dict[str, Any]) -> str:
    """The card's list of experts (source, prompts) and, when measured, routing specificity."""
    rows = "\n".join(f"| {i} | `{e.source}` | {len(e.prompts)} |" for i, e in enumerate(cfg.experts))
    text = (f"\n## Experts\n\nMerged with `upcycle merge` ({cfg.format} config): shared weights from "
            f"`{cfg.shared_weights}`, routers initialised `{cfg.router_init}`.\n\n| expert | source | prompts |\n"
            f"|---|---|---|\n{rows}\n")
    if cfg.shared_expert is not None:
        text += f"\nAlways-on shared expert: `{cfg.shared_expert.source}`.\n"
    spec = verification.get("specificity")
    if spec:
        text += (f"\nRouting specificity at conversion time: {spec['mean_top1']:.2f} of each expert's prompt tokens "
                 f"go to that expert first (mean over layers; chance {spec['chance_top1']:.2f}).\n")
    return text


def _card_verification(verification: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The card's verification line: skipped, the base comparison (identical sources), or per-source results."""
    from ..card import REPO_PLACEHOLDER as REPO

    if "skipped" in verification:
        return verification
    if "base" in verification:
        return {**verification["base"], "dense_rounded_to": verification["base"].get("weights_dtype")}
    rows = "; ".join(f"{r['source']} {r['max_abs_logit_diff']:.3g}" + (" (exact)" if r["exact_expected"] else "")
                     for r in verification["sources"])
    return {"text": f"measured at conversion time with every token sent to each source's expert, max |Δlogit| vs "
                    f"that source at float32: {rows}; check with `upcycle verify SOURCE {REPO} --force-expert E`"}
