"""What a merge reproduces, measured on the written output before it is moved into place: each source with
every token sent to its expert (exact when the source differs from the base only in its FFN), the base
when every source equals it, and the routing specificity of the experts' prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import VerificationError
from ..verify import verify as run_verify
from .compare import compare_sources
from .record import write_provenance
from .specificity import routing_specificity


def _dense_spec(source) -> str:
    """What ``verify`` opens for a source: its local folder (a Hub download), else what the user gave."""
    return str(source.folder) if source.repo_id else source.spec


def measure_fidelity(folder: Path, cfg, merged, ids: dict[str, str], plan, summary: dict[str, Any],
                     verify: Optional[bool], quiet: bool) -> dict[str, Any]:
    """Fidelity per source (every token sent to its expert) and routing specificity, measured on ``folder``
    layer by layer (:mod:`upcycle.runner`), so at any model size; ``verify=False`` skips it.

    Exact claims are checked: a source that differs from the base only in its FFN must be reproduced
    (else :class:`VerificationError`, nothing written).
    """
    if verify is False:
        return {"skipped": "disabled with --no-verify"}
    matches = compare_sources(merged)
    plain = all(e.residual_scale == 1.0 and not e.noise_std for e in cfg.experts) and cfg.shared_expert is None
    forced_exact = [plain and matches[ids[e.source]].shared_equal and plan.target.renormalises_top_k
                    for e in cfg.experts]
    identical = plain and all(m.shared_equal and m.ffn_equal for m in matches.values())
    summary["exact"] = identical
    write_provenance(folder, plan, cfg, summary, {"forced_exact": forced_exact})
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
                                       "mean_kl": float(f"{report.mean_kl:.3g}"),
                                       "exact_expected": forced_exact[index]})
            if forced_exact[index] and not report.passed:
                raise VerificationError(f"{expert.source} differs from the base only in its FFN, yet with every token "
                                        f"sent to expert {index} the logits differ by {report.max_abs_logit_diff:.3g};"
                                        " nothing was written. This is a bug in upcycle: please report it")
        if all(e.prompts for e in cfg.experts):
            spec = routing_specificity(folder, [e.prompts for e in cfg.experts])
            results["specificity"] = {k: spec[k] for k in ("mean_top1", "mean_topk", "chance_top1", "top1")}
    finally:
        torch.set_num_threads(threads)
    return results
