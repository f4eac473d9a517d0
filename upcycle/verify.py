"""Check that an MoE computes what its dense source computed: logits, KL and greedy generations."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .checkpoint import CONFIG_FILE, EXPERT_COUNT_KEYS, model_folder, provenance_of, read_recipe
from .errors import DataError, RecipeError, SourceNotFoundError
from .textdata import read_lines

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Mixture-of-Experts models route each token to a few experts, which",
    "1, 1, 2, 3, 5, 8, 13,",
)
DEFAULT_ATOL = {"float32": 1e-3, "float16": 0.25, "bfloat16": 0.5}


@dataclass
class VerifyReport:
    """The measured agreement between a dense model and its MoE."""

    max_abs_logit_diff: float
    mean_kl: float
    greedy_match: float
    greedy_token_agreement: float
    exact_expected: bool
    passed: bool
    atol: float
    dtype: str
    weights_dtype: str
    num_prompts: int
    max_new_tokens: int
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    #: False when any hidden state or logit of either model is NaN or infinite (then ``passed`` is False)
    finite: bool = True
    #: "greedy generation" (both models fit the memory budget) or "teacher-forced next tokens"
    comparison: str = "greedy generation"
    #: the first layer whose hidden states differ beyond the tolerance (or are non-finite), else None
    first_broken_layer: Optional[int] = None
    device: str = "cpu"
    #: per decoder layer: max |Δ| of the hidden states after it, whether all were finite, whether it broke
    #: (and, for a fine-grained split, ``split_selections`` of ``selections``)
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    #: fine-grained split only: token routings (over all layers) whose top-k splits a virtual group, which
    #: breaks exactness (router logits of different groups rounding to the same value in bf16/fp16)
    split_selections: Optional[int] = None
    router_selections: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def report_text(report: VerifyReport) -> str:
    """The human-readable verdict of a report (what ``upcycle verify`` prints)."""
    if not report.finite:
        verdict = "FAIL: non-finite values (NaN or inf)"
    elif report.exact_expected:
        verdict = "PASS (exact)" if report.passed else "FAIL: exact recipe but logits differ"
    else:
        verdict = "measured (recipe is not exact by design)"
    if report.first_broken_layer is not None and (not report.passed or not report.exact_expected):
        verdict += f"; hidden states first differ after layer {report.first_broken_layer}"
    if report.comparison == "greedy generation":
        greedy = (f"greedy: {report.greedy_match:.0%} of {report.num_prompts} prompts identical over "
                  f"{report.max_new_tokens} tokens ({report.greedy_token_agreement:.0%} of tokens)")
    else:
        greedy = (f"teacher-forced next tokens: {report.greedy_token_agreement:.0%} agree over "
                  f"{report.num_prompts} prompts (models too large to generate in the memory budget)")
    worst = max((layer for layer in report.per_layer), key=lambda l: (not l["finite"], l["max_abs_diff"]),
                default=None)
    layers = (f"\n  per layer: largest |Δhidden| {worst['max_abs_diff']:.3g} after layer {worst['layer']} of "
              f"{len(report.per_layer)}" if worst else "")
    if report.split_selections:
        layers += (f"\n  router: {report.split_selections} of {report.router_selections} selections split a virtual "
                   f"group (router logits of different groups tie in {report.dtype}; see docs/methods.md)")
    return (f"{verdict}\n  max |Δlogit|: {report.max_abs_logit_diff:.3g} (atol {report.atol:g}, {report.dtype}, "
            f"{report.device})\n  mean KL: {report.mean_kl:.3g}\n  {greedy}{layers}")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts: one per non-blank line of a text file, one per JSONL record (``text``), or those of a folder
    of such files (see :mod:`upcycle.textdata`)."""
    prompts = read_lines(path, "prompts")
    if not prompts:
        raise DataError(f"prompts {path}: empty (no non-blank line and no JSONL record)")
    return prompts


def _random_prompts(moe_path: Path):
    """Fixed pseudo-random token ids, for checkpoints that ship no tokenizer (tiny test models)."""
    import torch

    config = json.loads((moe_path / CONFIG_FILE).read_text())
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]  # bundled: under text_config
    gen = torch.Generator().manual_seed(0)
    encoded = [torch.randint(0, vocab, (1, n), generator=gen) for n in (5, 11, 17, 23)]
    return [f"<{ids.shape[1]} random token ids>" for ids in encoded], encoded, None


def _claims_exact(moe_path: Path) -> bool:
    return bool(provenance_of(read_recipe(moe_path)).get("exact", False))


def _claims_forced_exact(moe_path: Path, expert: int) -> bool:
    """True when the merge recorded that routing every token to ``expert`` reproduces its source exactly."""
    forced = provenance_of(read_recipe(moe_path)).get("merge", {}).get("forced_exact") or []
    return 0 <= expert < len(forced) and bool(forced[expert])


def forced_expert_count(config: Any, expert: int) -> int:
    """The MoE's expert count, after checking that every token may be sent to ``expert`` (renormalised top-k)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = next((getattr(text, k, None) or getattr(config, k, None) for k in EXPERT_COUNT_KEYS
                  if getattr(text, k, None) or getattr(config, k, None)), None)
    if count is None or not 0 <= expert < count:
        raise RecipeError(f"--force-expert {expert}: the MoE has {count or 'no'} experts")
    if getattr(text, "norm_topk_prob", True) is False:
        raise RecipeError("--force-expert needs renormalised top-k weights (norm_topk_prob=true)")
    return count


def copy_expert(module, expert: int, count: int) -> None:
    """Make every routed expert inside ``module`` (a model or one decoder layer) a copy of ``expert``. Experts are
    found as ``...experts.<e>...`` modules or as fused/packed ``[num_experts, ...]`` tensors (and biases)."""
    import re

    import torch

    params = dict(module.named_parameters())
    per_expert = re.compile(r"(^|\.)experts\.(\d+)\.")
    with torch.no_grad():
        for name, param in params.items():
            if per_expert.search(name):
                param.copy_(params[per_expert.sub(lambda m: f"{m.group(1)}experts.{expert}.", name, count=1)])
            elif param.shape[:1] == (count,) and (param.dim() == 3 or "experts." in name):
                param.copy_(param[expert].expand_as(param))  # fused/packed [E, ...] weights and their biases


def route_all_to_expert(model, expert: int) -> None:
    """Make every routed expert of each MoE layer a copy of ``expert``: with renormalised top-k weights this is
    the same as sending every token to ``expert`` alone, for any top-k."""
    copy_expert(model, expert, forced_expert_count(model.config, expert))


def _stored_dtype(moe_path: Path, default: str) -> str:
    """The dtype the MoE's weights are stored in, from its config."""
    config = json.loads((moe_path / CONFIG_FILE).read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or default
    return stored if stored in DEFAULT_ATOL else default


def _generate(load_kwargs: dict[str, Any], encoded: list, max_new_tokens: int, weights_dtype, dtype, device,
              pad_token_id: Optional[int], forced: Optional[int] = None) -> list[list[int]]:
    """Greedy continuations of every prompt with the whole model loaded; the model is freed before returning.

    Weights are first rounded to ``weights_dtype`` (the MoE's storage precision, so the dense model
    gets the same rounding the conversion applied), then the model computes in ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(**load_kwargs, dtype=weights_dtype).to(device, dtype).eval()
    if forced is not None:
        route_all_to_expert(model, forced)
    generations = []
    with torch.no_grad():
        for ids in encoded:
            ids = ids.to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
            generations.append(out[0, ids.shape[1]:].cpu().tolist())
    del model
    return generations


def _model_bytes(src, dtype) -> int:
    """Bytes of a checkpoint's floating-point tensors in ``dtype``."""
    import math

    import torch

    size = torch.empty(0, dtype=dtype).element_size()
    return sum(math.prod(info.shape) * size for info in src.infos.values() if info.dtype.is_floating_point)


def memory_budget(device) -> Optional[int]:
    """Bytes a whole model may take for greedy generation: half the free memory of ``device``, None if unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    from .runner.memory import available_memory

    free = available_memory()
    return free // 2 if free is not None else None


def _layer_tolerance(atol: float, reference) -> float:
    """The |Δ| of hidden states that counts as breaking: ``atol`` relative to the layer's largest value."""
    return atol * max(1.0, float(reference))


def _split_groups(moe_path: Path) -> Optional[tuple[int, int, int]]:
    """``(num_experts, top_k, group size)`` of a fine-grained split (virtual groups of 2+ experts), else None."""
    recipe = read_recipe(moe_path)
    if recipe is None or recipe.get("method") != "split":
        return None
    group = int(recipe.get("granularity", 1)) - int(recipe.get("shared_experts", 0))
    return (int(recipe["num_experts"]), int(recipe["top_k"]), group) if group > 1 else None


def split_selections(logits, top_k: int, group: int) -> tuple[int, int]:
    """``(selections that split a virtual group, all selections)`` for router logits ``[T, E]``.

    The experts are picked as the MoE classes pick them (top-k of the fp32 softmax of the logits); an exact
    split needs every picked group whole. Groups are ``e // group``.
    """
    import torch

    logits = logits.reshape(-1, logits.shape[-1])
    chosen = logits.float().softmax(-1).topk(top_k, dim=-1).indices // group
    per_group = torch.zeros(chosen.shape[0], logits.shape[-1] // group, dtype=torch.long)
    per_group.scatter_add_(1, chosen, torch.ones_like(chosen))
    broken = ((per_group != 0) & (per_group != group)).any(-1)
    return int(broken.sum()), int(broken.numel())


def _compare_layers(dense, moe, encoded, atol: float, quiet: bool, groups: Optional[tuple[int, int, int]] = None
                    ) -> tuple[list[dict[str, Any]], list, list]:
    """Both models layer by layer on every prompt: per-layer max |Δ hidden|, finiteness and (for a split) the
    router selections that split a virtual group; then the full logits."""
    import torch
    from tqdm.auto import tqdm

    from .runner import lockstep
    from .runner.routing import router_logit_sinks

    per_layer, sinks = [], []

    def watch_routers() -> None:
        if groups is not None:
            sinks.extend(router_logit_sinks(moe.model, groups[0]))

    steps = lockstep([dense, moe], encoded, on_embedded=watch_routers)
    for index, (dense_h, moe_h) in tqdm(steps, total=dense.num_layers, desc="Verifying", unit="layer",
                                         disable=quiet):
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(dense_h, moe_h))
        scale = max(float(a.float().abs().max()) for a in dense_h)
        finite = all(bool(torch.isfinite(h).all()) for h in dense_h + moe_h)
        entry = {"layer": index, "max_abs_diff": diff if finite else float("nan"), "finite": finite,
                 "broken": (not finite) or not diff <= _layer_tolerance(atol, scale)}
        if groups is not None:
            counted = [split_selections(x, groups[1], groups[2]) for _, sink in sinks for x in sink]
            entry["split_selections"] = sum(c[0] for c in counted)
            entry["selections"] = sum(c[1] for c in counted)
            for _, sink in sinks:
                sink.clear()
        per_layer.append(entry)
    dense_logits = dense.logits(dense_h)
    moe_logits = moe.logits(moe_h)
    return per_layer, [x[0] for x in dense_logits], [x[0] for x in moe_logits]


def verify(dense: str | Path, moe: str | Path, prompts: Optional[list[str]] = None, *, max_new_tokens: int = 16,
           dtype: str = "float32", atol: Optional[float] = None, device: str = "cpu", quiet: bool = False,
           max_layers: Optional[int] = None, generation_budget: Optional[int] = None,
           force_expert: Optional[int] = None) -> VerifyReport:
    """Run the dense model and the MoE on the same prompts, one decoder layer at a time, and compare.

    Both models stream through :mod:`upcycle.runner` in one pass (memory: one layer plus the activations);
    the hidden states are compared after every layer. Greedy generation runs when the larger model fits in
    ``generation_budget`` bytes (default: half the free memory of the device), else the next-token
    predictions of the prompts are compared (teacher forcing). ``passed`` is False when any value is
    non-finite, or when the MoE's recipe claims exactness and ``max_abs_logit_diff`` exceeds ``atol``.

    ``force_expert`` sends every token to that expert (see :func:`route_all_to_expert`): compare a merge
    with the source of that expert.
    """
    import torch
    import torch.nn.functional as F
    from transformers.utils import logging as hf_logging

    from .io import open_source
    from .runner import StreamedModel, resolve_device, resolve_dtype
    from .tokenizer import load_tokenizer

    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    moe_path = model_folder(moe)
    dense_src = open_source(str(dense), quiet=quiet)
    moe_src = open_source(str(moe_path), quiet=quiet)
    tokenizer = load_tokenizer(moe_path, dense_src.pretrained_kwargs())
    if tokenizer is not None:
        prompts = list(prompts or DEFAULT_PROMPTS)
        encoded = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
        empty = [p for p, ids in zip(prompts, encoded) if ids.numel() == 0]
        if empty:
            raise RecipeError(f"prompt {empty[0]!r} gives no tokens; give prompts with text")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    elif prompts:
        raise SourceNotFoundError(f"--prompts needs a tokenizer, and neither {moe} nor {dense} has one")
    else:
        prompts, encoded, pad = _random_prompts(moe_path)

    weights_dtype = _stored_dtype(moe_path, dtype)
    torch_weights = getattr(torch, weights_dtype)
    atol = DEFAULT_ATOL[dtype] if atol is None else atol
    forcing = None
    if force_expert is not None:
        count = forced_expert_count(moe_src.load_config(), force_expert)
        forcing = lambda module: copy_expert(module, force_expert, count)  # noqa: E731
    streamed = [StreamedModel(src, device=torch_device, dtype=torch_dtype, weights_dtype=torch_weights,
                              max_layers=max_layers, on_load=hook)
                for src, hook in ((dense_src, None), (moe_src, forcing))]
    groups = _split_groups(moe_path)
    per_layer, dense_logits, moe_logits = _compare_layers(*streamed, encoded, atol, quiet, groups)
    del streamed

    budget = memory_budget(torch_device) if generation_budget is None else generation_budget
    need = max(_model_bytes(dense_src, torch_dtype), _model_bytes(moe_src, torch_dtype))
    generate = max_new_tokens > 0 and budget is not None and need <= budget
    if generate:
        comparison = "greedy generation"
        dense_gen = _generate(dense_src.pretrained_kwargs(), encoded, max_new_tokens, torch_weights, torch_dtype,
                              torch_device, pad)
        moe_gen = _generate({"pretrained_model_name_or_path": str(moe_path)}, encoded, max_new_tokens,
                            torch_weights, torch_dtype, torch_device, pad, force_expert)
    else:
        comparison = "teacher-forced next tokens"
        dense_gen = [a.argmax(-1).tolist() for a in dense_logits]
        moe_gen = [b.argmax(-1).tolist() for b in moe_logits]

    per_prompt, kls, matches, agree, total = [], [], 0, 0, 0
    for prompt, a, b, ga, gb in zip(prompts, dense_logits, moe_logits, dense_gen, moe_gen):
        kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1).clamp_min(0)
        same = ga == gb
        per_prompt.append({"prompt": prompt, "max_abs_logit_diff": float((a - b).abs().max()),
                           "mean_kl": float(kl.mean()), "greedy_match": same, "dense_tokens": ga, "moe_tokens": gb})
        matches, agree, total = matches + same, agree + sum(x == y for x, y in zip(ga, gb)), total + len(ga)
        kls.append(kl)
    finite = all(layer["finite"] for layer in per_layer) and all(
        bool(torch.isfinite(x).all()) for x in dense_logits + moe_logits)
    diffs = torch.tensor([p["max_abs_logit_diff"] for p in per_prompt])
    max_diff = float(diffs.max()) if finite else float("nan")  # torch's max keeps NaN, Python's drops it
    exact_expected = _claims_exact(moe_path) if force_expert is None else _claims_forced_exact(moe_path, force_expert)
    broken = next((layer["layer"] for layer in per_layer if layer["broken"]), None)
    return VerifyReport(
        max_abs_logit_diff=max_diff,
        mean_kl=float(torch.cat(kls).mean()),
        greedy_match=matches / len(prompts),
        greedy_token_agreement=agree / total if total else 1.0,
        exact_expected=exact_expected,
        passed=finite and ((max_diff <= atol) if exact_expected else True),
        atol=atol,
        dtype=dtype,
        weights_dtype=weights_dtype,
        num_prompts=len(prompts),
        max_new_tokens=max_new_tokens if generate else 0,
        per_prompt=per_prompt,
        finite=finite,
        comparison=comparison,
        first_broken_layer=broken,
        device=str(torch_device),
        per_layer=per_layer,
        split_selections=sum(layer["split_selections"] for layer in per_layer) if groups else None,
        router_selections=sum(layer["selections"] for layer in per_layer) if groups else None,
    )
