"""Calibration data: read text, tokenize it, and collect per-layer statistics in one streamed dense pass.

Hooks on each MoE layer's FFN keep running statistics only: a streaming k-means of the hidden
states entering the FFN (for ``--router-init kmeans``) and, for ``--split-strategy activation``, a
random-projection sketch of every neuron's activations over the tokens plus their mean square.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .clustering import StreamingKMeans
from .errors import RecipeError, SourceNotFoundError
from .runner import StreamedModel, resolve_device, resolve_dtype
from .textdata import data_files, read_documents
from .tokenizer import load_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from .io import DenseSource
    from .plan import ConversionPlan

TOKENS_PER_EXPERT = 16
SKETCH_DIM = 64
SEQUENCE_LENGTH = 512
BATCH_SIZE = 4


def required_tokens(num_experts: int) -> int:
    return TOKENS_PER_EXPERT * num_experts


def calibration_tokenizer(src: "DenseSource") -> Any:
    """The dense model's tokenizer, which calibration needs; a clear error when it has none."""
    tokenizer = load_tokenizer(src.pretrained_kwargs())
    if tokenizer is None:
        raise SourceNotFoundError(f"--calibration needs the dense model's tokenizer, and {src.spec} has none; "
                                  "add its tokenizer files to the model folder")
    return tokenizer


def tokenize_calibration(path: str | Path, tokenizer: Any, max_tokens: int, num_experts: int) -> torch.Tensor:
    """Token ids [n] of the calibration text (documents joined by EOS), at most ``max_tokens``."""
    files = data_files(path, "--calibration")
    pieces, total = [], 0
    for text in read_documents(path, "--calibration"):
        if total >= max_tokens:
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and ids:
            ids = ids + [tokenizer.eos_token_id]
        pieces.append(torch.tensor(ids[: max_tokens - total], dtype=torch.long))
        total += pieces[-1].numel()
    if total == 0:
        raise RecipeError(f"--calibration {path}: no text in {', '.join(str(f) for f in files[:3])}")
    needed = required_tokens(num_experts)
    if total < needed:
        capped = " (capped by --calibration-tokens)" if total == max_tokens else ""
        raise RecipeError(f"--calibration {path} gives {total} tokens{capped}; {num_experts} experts need at least "
                          f"{needed} ({TOKENS_PER_EXPERT} per expert): add text or raise --calibration-tokens")
    return torch.cat(pieces)


@dataclass
class LayerStats:
    """Running statistics of one MoE layer."""

    kmeans: Any = None
    sketch: Optional[torch.Tensor] = None
    square_sum: Optional[torch.Tensor] = None
    tokens: int = 0


@dataclass
class CalibrationStats:
    """The statistics of every MoE layer, after the pass."""

    layers: dict[int, LayerStats] = field(default_factory=dict)
    tokens: int = 0

    def hidden_centroids(self, layer: int) -> Optional[torch.Tensor]:
        stats = self.layers.get(layer)
        return stats.kmeans.result() if stats is not None and stats.kmeans is not None else None

    def activations(self, layer: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        stats = self.layers.get(layer)
        if stats is None or stats.sketch is None:
            return None, None
        return stats.sketch, stats.square_sum / max(stats.tokens, 1)


def collect_statistics(src: "DenseSource", plan: "ConversionPlan", ids: torch.Tensor, *, want_hidden: bool,
                       want_activations: bool, quiet: bool = False, device: str = "cpu", dtype: str = "float32",
                       max_layers: Optional[int] = None) -> CalibrationStats:
    """Run the dense model over ``ids`` one decoder layer at a time, with hooks on every MoE layer's FFN.

    The model streams through :mod:`upcycle.runner` (memory: one layer plus the hidden states of the
    calibration tokens); the pass stops after the last MoE layer. The statistics are the same as a
    forward of the whole model batch by batch: each layer sees the batches in the same order, and the
    sketch's random projection of each batch is drawn in that order too.
    """
    from tqdm.auto import tqdm

    model = StreamedModel(src, device=resolve_device(device), dtype=resolve_dtype(dtype), max_layers=max_layers)
    modules = dict(model.model.named_modules())
    stats = CalibrationStats()
    sketch_gen = torch.Generator().manual_seed(plan.recipe.seed)
    current: dict[str, torch.Tensor] = {}
    handles = []
    for layer in plan.moe_layers:
        entry = stats.layers[layer] = LayerStats()
        down = plan.family.mlp_key(layer, "down")[: -len(".weight")]
        if want_hidden:
            rows = max(plan.layers[layer].groups) + 1
            entry.kmeans = StreamingKMeans(rows, torch.Generator().manual_seed(plan.recipe.seed * 7919 + layer))
            handles.append(modules[down.rsplit(".", 1)[0]].register_forward_pre_hook(
                lambda mod, args, entry=entry: entry.kmeans.update(args[0])))
        if want_activations:
            handles.append(modules[down].register_forward_pre_hook(
                lambda mod, args, entry=entry: _update_sketch(entry, args[0], current["r"])))
    length = min(SEQUENCE_LENGTH, plan.family.max_positions(plan.dense_config) or SEQUENCE_LENGTH)
    sequences = list(ids.split(length))
    batches = [group for start in range(0, len(sequences), BATCH_SIZE)
               for group in _same_length(sequences[start:start + BATCH_SIZE])]
    projections = [torch.randn(group.numel(), SKETCH_DIM, generator=sketch_gen) for group in batches]
    last = max(plan.moe_layers)
    try:
        hidden = model.embed(batches)
        for index in tqdm(range(last + 1), unit="layer", desc="Calibrating", disable=quiet):
            with model.layer(index) as module:
                out = []
                for h, r, position in zip(hidden, projections, range(len(batches))):
                    current["r"] = r
                    out.append(model.run_layer(module, index, [h], batch=position)[0])
                hidden = out
    finally:
        for handle in handles:
            handle.remove()
    stats.tokens = ids.numel()
    return stats


def _same_length(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """Stack the sequences of one batch; a shorter last sequence goes alone."""
    full = [s for s in batch if s.numel() == batch[0].numel()]
    groups = [torch.stack(full)]
    groups += [s.unsqueeze(0) for s in batch[len(full):]]
    return groups


def _update_sketch(entry: LayerStats, h: torch.Tensor, r: torch.Tensor) -> None:
    h = h.detach().reshape(-1, h.shape[-1]).float()
    if entry.sketch is None:
        entry.sketch = torch.zeros(h.shape[1], r.shape[1])
        entry.square_sum = torch.zeros(h.shape[1])
    entry.sketch += (h.t() @ r.to(h.device)).cpu()
    entry.square_sum += (h * h).sum(0).cpu()
    entry.tokens += h.shape[0]
