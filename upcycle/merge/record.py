"""The merge's record in the output folder: config and generation config, tokenizer, ``upcycle_recipe.json``
(the merge config under ``upcycle.merge``) and the model card listing every source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..card import REPO_PLACEHOLDER, render_card, resolve_base_models, source_license
from ..checkpoint import (CARD_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, RECIPE_FILE, library_versions, provenance_of,
                          read_recipe, write_recipe)


def write_provenance(folder: Path, plan, cfg, summary: dict[str, Any], extra: dict[str, Any]) -> None:
    """``upcycle_recipe.json``: the plan's flat recipe keys, provenance, and the merge config plus ``extra``."""
    provenance = {"source": cfg.base, "versions": library_versions(), **summary, "merge": {**cfg.to_dict(), **extra}}
    # flat keys say what was done (method merge, the merge's router init): `inspect` reads them
    write_recipe(folder, {**plan.recipe.to_dict(), "method": "merge", "router_init": cfg.router_init}, provenance)


def write_model_files(folder: Path, plan, merged, base_config) -> list[str]:
    """config.json (and remote code), the base's generation config and tokenizer."""
    plan.target.build_config(plan).save_pretrained(folder)
    written = [CONFIG_FILE] + plan.target.write_extra_files(folder, plan)
    merged.generation_config(base_config).save_pretrained(folder)
    written.append(GENERATION_CONFIG_FILE)
    return written + merged.save_tokenizer(folder)


def write_record(folder: Path, plan, cfg, merged, summary: dict[str, Any], verification: dict[str, Any],
                  repo_id: Optional[str]) -> list[str]:
    """upcycle_recipe.json (the merge config under ``upcycle.merge``) and the model card listing every source."""
    forced = provenance_of(read_recipe(folder)).get("merge", {}).get("forced_exact")
    write_provenance(folder, plan, cfg, {**summary, "verification": verification},
                      {"forced_exact": forced} if forced is not None else {})
    sources = [merged.base, *[s for s in merged.sources.values() if s is not merged.base]]
    # Hub ids only (--base-model, or each source's as `convert` finds it); the Experts section lists every source
    names = resolve_base_models(cfg.card_base_model, ((s.repo_id, s.folder) for s in sources))
    remote = bool(json.loads((folder / CONFIG_FILE).read_text()).get("auto_map"))
    table = {"base_model": cfg.base, "shared_weights": cfg.shared_weights, "router_init": cfg.router_init,
             "top_k": cfg.top_k, "experts": [e.source for e in cfg.experts], "target": plan.target.name,
             "dtype": plan.dtype_name, "seed": cfg.seed}
    card = render_card(summary, table, names or None,
                       verification=_card_verification(verification),
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
    if "skipped" in verification:
        return verification
    if "base" in verification:
        return {**verification["base"], "dense_rounded_to": verification["base"].get("weights_dtype")}
    rows = "; ".join(f"{r['source']} {r['max_abs_logit_diff']:.3g}" + (" (exact)" if r["exact_expected"] else "")
                     for r in verification["sources"])
    return {"text": f"measured at conversion time with every token sent to each source's expert, max |Δlogit| vs "
                    f"that source at float32: {rows}; check with "
                    f"`upcycle verify SOURCE {REPO_PLACEHOLDER} --force-expert E`"}
