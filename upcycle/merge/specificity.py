"""Routing specificity of an MoE checkpoint: per layer, the share of each expert's prompt tokens that the
router sends to that expert (top-1, and within the top-k).

Works on any MoE folder transformers loads whose routers are linear ``[num_experts, hidden]`` weights
(upcycle's outputs and mergekit's alike): a hook on each router reads the hidden state it is given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

_ROUTER_NAME = re.compile(r"(?:^|\.)(?:gate|router)\.weight$")
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def router_modules(model: Any, num_experts: int) -> dict[int, tuple[Any, torch.Tensor]]:
    """``layer -> (block, weight)`` for every router (a ``gate``/``router`` weight of shape [E, hidden]) and the
    MoE block that owns it, whose input is what the router reads."""
    modules = dict(model.named_modules())
    found = {}
    for name, param in model.named_parameters():
        layer = _LAYER.search(name)
        if param.dim() == 2 and param.shape[0] == num_experts and _ROUTER_NAME.search(name) and layer:
            found[int(layer.group(1))] = (modules[name.rsplit(".", 2)[0]], param)
    return found


def num_experts_of(folder: Path) -> tuple[int, int]:
    """``(num_experts, top_k)`` from an MoE config (native or bundled)."""
    from ..checkpoint import CONFIG_FILE, expert_count, experts_per_token

    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    top_k = experts_per_token(config)
    return int(expert_count(config)), int(top_k[0] if isinstance(top_k, list) else top_k)


def routing_specificity(moe: str | Path, prompts: Sequence[Sequence[str]], tokenizer: Optional[Any] = None,
                        model: Optional[Any] = None) -> dict[str, Any]:
    """Per layer and expert, the share of expert e's prompt tokens (``prompts[e]``) routed to e.

    Returns ``{"top1": {layer: [share per expert]}, "topk": {...}, "mean_top1", "mean_topk", "chance_top1",
    "tokens": [per expert]}``. Special tokens are left out.
    """
    from transformers import AutoModelForCausalLM

    from ..tokenizer import load_tokenizer
    from .probe import encode_prompts

    folder = Path(moe)
    num_experts, top_k = num_experts_of(folder)
    if len(prompts) != num_experts:
        raise ValueError(f"{num_experts} experts but {len(prompts)} prompt lists")
    tokenizer = tokenizer or load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer to encode the prompts with")
    model = model or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    routers = router_modules(model, num_experts)
    choices: dict[int, torch.Tensor] = {}

    def hook(layer: int, weight: torch.Tensor):
        def capture(module, args):
            h = args[0].detach().reshape(-1, weight.shape[1]).float()
            choices[layer] = (h @ weight.detach().float().t()).topk(top_k, dim=-1).indices
        return capture

    handles = [module.register_forward_pre_hook(hook(layer, weight)) for layer, (module, weight) in routers.items()]
    layers = sorted(routers)
    top1 = {layer: [0] * num_experts for layer in layers}
    topk = {layer: [0] * num_experts for layer in layers}
    tokens = [0] * num_experts
    try:
        with torch.no_grad():
            for expert, texts in enumerate(prompts):
                for ids, keep in encode_prompts(tokenizer, texts):
                    model(ids.view(1, -1))
                    tokens[expert] += int(keep.sum())
                    for layer in layers:
                        chosen = choices[layer][keep]
                        top1[layer][expert] += int((chosen[:, 0] == expert).sum())
                        topk[layer][expert] += int((chosen == expert).any(-1).sum())
    finally:
        for handle in handles:
            handle.remove()
    share = lambda counts: {str(l): [c / max(n, 1) for c, n in zip(counts[l], tokens)] for l in layers}
    top1_share, topk_share = share(top1), share(topk)
    mean = lambda table: sum(sum(v) for v in table.values()) / max(1, len(table) * num_experts)
    return {"top1": top1_share, "topk": topk_share, "mean_top1": mean(top1_share), "mean_topk": mean(topk_share),
            "chance_top1": 1 / num_experts, "top_k": top_k, "tokens": tokens}
