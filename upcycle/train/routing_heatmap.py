"""Measure which experts a model routes tokens to on some data, and draw it as a layers x experts heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import model_folder
from ..errors import RecipeError
from ..io import open_source
from ..runner import StreamedModel, resolve_device, resolve_dtype
from ..runner.routing import router_logit_sinks
from ..tokenizer import load_tokenizer
from .data import PackedDataset, tokenise, vocab_check
from .moe_model import load_moe_config, router_layers, text_attr
from .monitor import assignment_counts, load_stats
from .run import eos_id


def measure_routing(model_path: str | Path, data: str | Path, seq_len: int = 512, max_tokens: int = 65536,
                    batch_size: int = 4, device: str = "cpu", dtype: str = "float32",
                    max_layers: Optional[int] = None) -> dict[str, Any]:
    """Expert-load statistics (see :func:`upcycle.train.monitor.load_stats`) of ``model_path`` on ``data``.

    The data is read like training data (text, JSONL, folder), packed into ``seq_len`` blocks and cut at
    ``max_tokens``. The model runs one decoder layer at a time (:mod:`upcycle.runner`): memory is one layer
    plus the hidden states of the tokens, whatever the model's size.
    """
    model_path = model_folder(model_path)
    config, num_experts, top_k = load_moe_config(model_path)
    tokenizer = load_tokenizer(model_path)
    stream = tokenise(data, tokenizer, eos_id(tokenizer, config))[:max_tokens]
    seq_len = min(seq_len, len(stream), text_attr(config, "max_position_embeddings") or seq_len)
    dataset = PackedDataset(stream, seq_len, str(data))
    vocab_check(dataset, text_attr(config, "vocab_size"), str(data))

    model = StreamedModel(open_source(str(model_path)), device=resolve_device(device), dtype=resolve_dtype(dtype),
                          max_layers=max_layers, config=config)
    batches = [dataset.blocks[start:start + batch_size] for start in range(0, len(dataset), batch_size)]
    hidden = model.embed(batches)
    logits = [sink for _, sink in router_logit_sinks(model.model, num_experts)]  # after embed (see there)
    counts = torch.zeros(len(logits), num_experts, dtype=torch.float64)
    for index in range(model.num_layers):
        with model.layer(index) as layer:
            hidden = model.run_layer(layer, index, hidden)
        for row, captured in enumerate(logits):
            if captured:
                counts[row] += assignment_counts(captured, top_k).sum(0).cpu()
                captured.clear()
    stats = load_stats(counts, router_layers(model.model, num_experts), top_k)
    stats.update(model=str(model_path), data=str(data), top_k=top_k)
    return stats


def plot_routing_heatmap(stats: dict[str, Any], path: str | Path, title: Optional[str] = None) -> Path:
    """Write a PNG heatmap of each layer's expert shares (rows: layers, columns: experts)."""
    try:
        import matplotlib
    except ImportError:
        raise RecipeError("the routing heatmap needs matplotlib: pip install 'upcycle[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shares = np.asarray(stats["share"], dtype=float)
    layers, experts = shares.shape
    uniform = 1.0 / experts
    fig, ax = plt.subplots(figsize=(min(5 + 0.45 * experts, 20), min(2 + 0.35 * layers, 24)), dpi=100)
    image = ax.imshow(shares, aspect="auto", cmap="magma", vmin=0.0, vmax=max(float(shares.max()), 2 * uniform))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (cv of the load)")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), [f"{layer} ({cv:.2f})" for layer, cv in zip(stats["layers"], stats["cv"])])
    fig.colorbar(image, ax=ax, label=f"share of assignments (uniform {uniform:.3f})")
    ax.set_title(title or f"expert load over {stats['tokens']} tokens, mean cv {stats['cv_mean']:.3f}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
