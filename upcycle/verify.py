"""Check that an MoE computes what its dense source computed: logits, KL and greedy generations."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .checkpoint import CONFIG_FILE, model_folder, provenance_of, read_recipe
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def route_all_to_expert(model, expert: int) -> None:
    """Make every routed expert of each MoE layer a copy of ``expert``: with renormalised top-k weights this is
    the same as sending every token to ``expert`` alone, for any top-k. Experts are found as
    ``...experts.<e>...`` modules or as fused/packed ``[num_experts, ...]`` tensors (3-d)."""
    import re

    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = next((getattr(config, k, None) or getattr(model.config, k, None) for k in
                  ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                  if getattr(config, k, None) or getattr(model.config, k, None)), None)
    if count is None or not 0 <= expert < count:
        raise RecipeError(f"--force-expert {expert}: the MoE has {count or 'no'} experts")
    if getattr(config, "norm_topk_prob", True) is False:
        raise RecipeError("--force-expert needs renormalised top-k weights (norm_topk_prob=true)")
    params = dict(model.named_parameters())
    per_expert = re.compile(r"\.experts\.(\d+)\.")
    with torch.no_grad():
        for name, param in params.items():
            match = per_expert.search(name)
            if match:
                param.copy_(params[per_expert.sub(f".experts.{expert}.", name, count=1)])
            elif param.dim() == 3 and param.shape[0] == count:
                param.copy_(param[expert].expand_as(param))


def _stored_dtype(moe_path: Path, default: str) -> str:
    """The dtype the MoE's weights are stored in, from its config."""
    config = json.loads((moe_path / CONFIG_FILE).read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or default
    return stored if stored in DEFAULT_ATOL else default


def _run(load_kwargs: dict[str, Any], encoded: list, max_new_tokens: int, weights_dtype, dtype, device: str,
         pad_token_id: Optional[int], forced: Optional[int] = None):
    """Logits and greedy continuations of every prompt; the model is freed before returning.

    Weights are first rounded to ``weights_dtype`` (the MoE's storage precision, so the dense model
    gets the same rounding the conversion applied), then the model computes in ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(**load_kwargs, dtype=weights_dtype).to(device, dtype).eval()
    if forced is not None:
        route_all_to_expert(model, forced)
    logits, generations = [], []
    with torch.no_grad():
        for ids in encoded:
            ids = ids.to(device)
            logits.append(model(ids).logits[0].float().cpu())
            if max_new_tokens > 0:
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
                generations.append(out[0, ids.shape[1]:].cpu().tolist())
            else:
                generations.append([])
    del model
    return logits, generations


def _check_device(device: str) -> None:
    """Refuse a device torch cannot use before any model is loaded."""
    import torch

    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, AssertionError) as exc:
        raise RecipeError(f"--device {device!r} cannot be used: {str(exc).splitlines()[0]}") from None


def verify(dense: str | Path, moe: str | Path, prompts: Optional[list[str]] = None, *, max_new_tokens: int = 16,
           dtype: str = "float32", atol: Optional[float] = None, device: str = "cpu",
           quiet: bool = False, force_expert: Optional[int] = None) -> VerifyReport:
    """Run the dense model and the MoE on the same prompts and compare.

    ``force_expert`` sends every token to that expert (see :func:`route_all_to_expert`): compare a merge with the
    source of that expert.

    The models run one after the other, so memory holds one model at a time. ``passed`` is False
    when the MoE's recipe claims exactness and ``max_abs_logit_diff`` exceeds ``atol``.
    """
    import torch
    import torch.nn.functional as F
    from transformers.utils import logging as hf_logging

    from .io import open_source
    from .tokenizer import load_tokenizer

    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise RecipeError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    _check_device(device)
    moe_path = model_folder(moe)
    dense_src = open_source(str(dense), quiet=quiet)
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
    dense_logits, dense_gen = _run(dense_src.pretrained_kwargs(), encoded, max_new_tokens, torch_weights,
                                   torch_dtype, device, pad)
    moe_logits, moe_gen = _run({"pretrained_model_name_or_path": str(moe_path)}, encoded, max_new_tokens,
                               torch_weights, torch_dtype, device, pad, force_expert)

    per_prompt, max_diff, kls, matches, agree, total = [], 0.0, [], 0, 0, 0
    for prompt, a, b, ga, gb in zip(prompts, dense_logits, moe_logits, dense_gen, moe_gen):
        diff = float((a - b).abs().max())
        kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1).clamp_min(0)
        same = ga == gb
        agreed = sum(x == y for x, y in zip(ga, gb))
        per_prompt.append({"prompt": prompt, "max_abs_logit_diff": diff, "mean_kl": float(kl.mean()),
                           "greedy_match": same, "dense_tokens": ga, "moe_tokens": gb})
        max_diff, matches, agree, total = max(max_diff, diff), matches + same, agree + agreed, total + len(ga)
        kls.append(kl)
    exact_expected = _claims_exact(moe_path) if force_expert is None else _claims_forced_exact(moe_path, force_expert)
    atol = DEFAULT_ATOL[dtype] if atol is None else atol
    return VerifyReport(
        max_abs_logit_diff=max_diff,
        mean_kl=float(torch.cat(kls).mean()),
        greedy_match=matches / len(prompts),
        greedy_token_agreement=agree / total if total else 1.0,
        exact_expected=exact_expected,
        passed=(max_diff <= atol) if exact_expected else True,
        atol=atol,
        dtype=dtype,
        weights_dtype=weights_dtype,
        num_prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        per_prompt=per_prompt,
    )
