"""Routing specificity of an MoE checkpoint: per layer, the share of each expert's prompt tokens that the
router sends to that expert (top-1, and within the top-k).

Works on any MoE folder transformers loads (upcycle's outputs and mergekit's alike): the model runs layer by
layer through :mod:`upcycle.runner`, and each router's logits are read as it computes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from ..checkpoint import CONFIG_FILE, expert_count, experts_per_token
from ..io import open_source
from ..runner import StreamedModel, resolve_device, resolve_dtype
from ..runner.routing import router_logit_sinks
from ..tokenizer import load_tokenizer
from .probe import encode_prompts

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def num_experts_of(folder: Path) -> tuple[int, int]:
    """``(num_experts, top_k)`` from an MoE config (native or bundled)."""
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    top_k = experts_per_token(config)
    return int(expert_count(config)), int(top_k[0] if isinstance(top_k, list) else top_k)


def routing_specificity(moe: str | Path, prompts: Sequence[Sequence[str]], tokenizer: Optional[Any] = None,
                        device: str = "cpu") -> dict[str, Any]:
    """Per layer and expert, the share of expert e's prompt tokens (``prompts[e]``) routed to e.

    Returns ``{"top1": {layer: [share per expert]}, "topk": {...}, "mean_top1", "mean_topk", "chance_top1",
    "tokens": [per expert]}``. Special tokens are left out. The MoE runs one decoder layer at a time
    (:mod:`upcycle.runner`), so memory is one layer plus the prompts' hidden states, whatever its size.
    """
    folder = Path(moe)
    num_experts, top_k = num_experts_of(folder)
    if len(prompts) != num_experts:
        raise ValueError(f"{num_experts} experts but {len(prompts)} prompt lists")
    tokenizer = tokenizer or load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer to encode the prompts with")
    encoded = [(expert, ids, keep) for expert, texts in enumerate(prompts) for ids, keep in encode_prompts(tokenizer, texts)]
    model = StreamedModel(open_source(str(folder)), device=resolve_device(device), dtype=resolve_dtype("float32"))
    hidden = model.embed([ids.view(1, -1) for _, ids, _ in encoded])
    sinks = [(int(found.group(1)), sink) for name, sink in router_logit_sinks(model.model, num_experts)
             if (found := _LAYER.search(name + "."))]
    layers = [layer for layer, _ in sinks]
    top1 = {layer: [0] * num_experts for layer in layers}
    topk = {layer: [0] * num_experts for layer in layers}
    tokens = [0] * num_experts
    for expert, _, keep in encoded:
        tokens[expert] += int(keep.sum())
    for index in range(model.num_layers):
        with model.layer(index) as layer_module:
            hidden = model.run_layer(layer_module, index, hidden)
        for layer, sink in sinks:
            for (expert, _, keep), logits in zip(encoded, sink):  # one router call per prompt, in order
                chosen = logits.detach().reshape(-1, num_experts).float().topk(top_k, dim=-1).indices.cpu()[keep]
                top1[layer][expert] += int((chosen[:, 0] == expert).sum())
                topk[layer][expert] += int((chosen == expert).any(-1).sum())
            sink.clear()
    share = lambda counts: {str(l): [c / max(n, 1) for c, n in zip(counts[l], tokens)] for l in layers}
    top1_share, topk_share = share(top1), share(topk)
    mean = lambda table: sum(sum(v) for v in table.values()) / max(1, len(table) * num_experts)
    return {"top1": top1_share, "topk": topk_share, "mean_top1": mean(top1_share), "mean_topk": mean(topk_share),
            "chance_top1": 1 / num_experts, "top_k": top_k, "tokens": tokens}
