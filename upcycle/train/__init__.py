"""Fine-tuning upcycled MoE checkpoints on transformers' Trainer, with expert-load monitoring.

``train`` runs a whole job; ``UpcycleTrainer`` and ``ExpertLoadCallback`` plug into your own Trainer code.
"""

from __future__ import annotations

from typing import Any
import importlib

__all__ = ["train", "TrainOptions", "TrainResult", "UpcycleTrainer", "ExpertLoadCallback", "measure_routing",
           "plot_routing_heatmap"]

_LAZY = {"train": ".run", "TrainOptions": ".run", "TrainResult": ".run", "UpcycleTrainer": ".trainer",
         "ExpertLoadCallback": ".monitor", "measure_routing": ".routing_heatmap",
         "plot_routing_heatmap": ".routing_heatmap"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'upcycle.train' has no attribute {name!r}")
