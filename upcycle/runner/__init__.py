"""The layer-streaming runner: run a causal LM one decoder layer at a time, in bounded memory, on any device.

Used by verify, calibration and ``inspect --routing``; see :mod:`upcycle.runner.streamed` for how.
"""

from __future__ import annotations

from typing import Optional

import torch

from .device import DTYPES, MAX_LAYERS_ENV, LayerCapError, layer_cap, resolve_device, resolve_dtype
from .streamed import StreamedModel, build_skeleton, decoder_layers

__all__ = ["DTYPES", "MAX_LAYERS_ENV", "LayerCapError", "StreamedModel", "build_skeleton", "decoder_layers",
           "forward_logits", "layer_cap", "resolve_device", "resolve_dtype"]


def forward_logits(model: StreamedModel, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits ``[B, T, V]`` of each batch of token ids, one layer resident at a time."""
    hidden = model.embed(batches)
    for index in range(model.num_layers):
        with model.layer(index) as layer:
            hidden = model.run_layer(layer, index, hidden)
    return model.logits(hidden)


def open_streamed(spec: str, *, device: str = "cpu", dtype: str = "float32", weights_dtype: Optional[str] = None,
                  max_layers: Optional[int] = None) -> StreamedModel:
    """A :class:`StreamedModel` over a dense source spec or an upcycle output folder."""
    from ..io import open_source

    return StreamedModel(open_source(spec), device=resolve_device(device), dtype=resolve_dtype(dtype),
                         weights_dtype=resolve_dtype(weights_dtype) if weights_dtype else None,
                         max_layers=max_layers)
