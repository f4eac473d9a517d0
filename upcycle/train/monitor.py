"""Expert-load monitoring: the fraction of top-k assignments each expert receives, per layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import TrainerCallback
import torch.distributed as dist


def assignment_counts(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """``[layers, experts]`` counts of top-k assignments (the experts a softmax top-k router picks)."""
    rows = []
    for logits in router_logits:
        logits = logits.detach().reshape(-1, logits.shape[-1])
        chosen = torch.topk(logits.float(), top_k, dim=-1).indices.reshape(-1)
        rows.append(torch.bincount(chosen, minlength=logits.shape[-1]).to(torch.float64))
    return torch.stack(rows)


def load_stats(counts: torch.Tensor, layers: Optional[Sequence[int]] = None, top_k: int = 1) -> dict[str, Any]:
    """Per-layer share of assignments, coefficient of variation (std/mean) and min/max share.

    A perfectly balanced layer has cv 0 and every share equal to 1/experts.
    """
    counts = counts.double().cpu()
    layers = list(layers) if layers is not None else list(range(counts.shape[0]))
    shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    cv = counts.std(dim=1, unbiased=False) / counts.mean(dim=1).clamp_min(1e-12)
    return {
        "layers": layers,
        "num_experts": counts.shape[1],
        "tokens": int(counts[0].sum()) // top_k if counts.numel() else 0,
        "share": shares.tolist(),
        "cv": cv.tolist(),
        "min_share": shares.min(dim=1).values.tolist(),
        "max_share": shares.max(dim=1).values.tolist(),
        "cv_mean": float(cv.mean()),
        "cv_max": float(cv.max()),
        "min_share_overall": float(shares.min()),
        "max_share_overall": float(shares.max()),
    }


def log_entries(stats: dict[str, Any]) -> dict[str, float]:
    """Flat scalars for the Trainer's logs: aggregates plus each layer's cv."""
    entries = {"moe/load_cv": round(stats["cv_mean"], 4), "moe/load_cv_max": round(stats["cv_max"], 4),
               "moe/min_share": round(stats["min_share_overall"], 4),
               "moe/max_share": round(stats["max_share_overall"], 4)}
    for layer, cv in zip(stats["layers"], stats["cv"]):
        entries[f"moe/layer{layer}_cv"] = round(cv, 4)
    return entries


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class ExpertLoadCallback(TrainerCallback):
    """Counts expert assignments during training and adds load statistics to the Trainer's logs.

    The trainer feeds it with :meth:`observe` (router logits of each training forward). At every
    logging step the counts of the window are summed over processes and logged (``moe/load_cv``,
    ``moe/min_share``, ``moe/max_share``, ``moe/layerN_cv``, ``moe/aux_loss``, ``moe/z_loss``); at the end
    :attr:`summary` holds the whole run and the last window, and ``expert_load.json`` is written.
    """

    def __init__(self, top_k: int, layers: Optional[Sequence[int]] = None):
        self.top_k = top_k
        self.layers = list(layers) if layers is not None else None
        self.window: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None
        self.losses = torch.zeros(3, dtype=torch.float64)  # aux, z, micro-batches
        self.last: Optional[dict[str, Any]] = None
        self.summary: Optional[dict[str, Any]] = None

    def observe(self, router_logits: Sequence[torch.Tensor], aux: torch.Tensor, z: torch.Tensor) -> None:
        counts = assignment_counts(router_logits, self.top_k)
        self.window = counts if self.window is None else self.window + counts
        self.losses = self.losses.to(counts.device) + torch.stack(
            [aux.detach().double(), z.detach().double(), torch.ones((), dtype=torch.float64, device=counts.device)])

    def _reduce_window(self) -> Optional[torch.Tensor]:
        # every process calls this at the same logging steps, so the collective lines up
        window = _all_reduce(self.window.clone()) if self.window is not None else None
        self.window = None
        return window

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # the end-of-training metrics: no window to close
            return
        window = self._reduce_window()
        losses = _all_reduce(self.losses.clone())
        self.losses.zero_()
        if window is None:
            return
        self.total = window if self.total is None else self.total + window
        self.last = load_stats(window, self.layers, self.top_k)
        entries = log_entries(self.last)
        if losses[2] > 0:
            entries["moe/aux_loss"] = round(float(losses[0] / losses[2]), 5)
            entries["moe/z_loss"] = round(float(losses[1] / losses[2]), 5)
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_train_end(self, args, state, control, **kwargs):
        window = self._reduce_window()
        if window is not None:
            self.total = window if self.total is None else self.total + window
            self.last = load_stats(window, self.layers, self.top_k)
        if self.total is None:
            return
        self.summary = {"run": load_stats(self.total, self.layers, self.top_k), "last_window": self.last}
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "expert_load.json").write_text(json.dumps(self.summary, indent=2) + "\n")
