"""The layer-streaming runner: run a causal LM one decoder layer at a time, in bounded memory, on any device.

Used by verify, calibration and ``inspect --routing``; see :mod:`upcycle.runner.streamed` for how.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from ..io import open_source
from .device import DTYPES, MAX_LAYERS_ENV, LayerCapError, layer_cap, resolve_device, resolve_dtype
from .streamed import StreamedModel, build_skeleton, decoder_layers

__all__ = ["DTYPES", "MAX_LAYERS_ENV", "LayerCapError", "StreamedModel", "build_skeleton", "decoder_layers",
           "forward_logits", "layer_cap", "lockstep", "resolve_device", "resolve_dtype"]


def forward_logits(model: StreamedModel, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits ``[B, T, V]`` of each batch of token ids, one layer resident at a time."""
    hidden = model.embed(batches)
    for index in range(model.num_layers):
        with model.layer(index) as layer:
            hidden = model.run_layer(layer, index, hidden)
    return model.logits(hidden)


def lockstep(models: list[StreamedModel], batches: list[torch.Tensor], on_embedded: Optional[Callable[[], None]] = None
             ) -> Iterator[tuple[int, list[list[torch.Tensor]]]]:
    """Run several models on the same token ids layer by layer, one layer of each resident at a time.

    Yields ``(layer, hidden)`` after each layer, ``hidden[m][b]`` being model ``m``'s output on batch ``b``;
    the caller may compare or replace them. The last yield is layer ``num_layers - 1``; then call
    ``model.logits(hidden[m])``. ``on_embedded`` runs once the embeddings are done, before the first layer.
    """
    hidden = [model.embed(batches) for model in models]
    if on_embedded is not None:
        on_embedded()
    for index in range(max(model.num_layers for model in models)):
        for m, model in enumerate(models):
            if index < model.num_layers:
                with model.layer(index) as layer:
                    hidden[m] = model.run_layer(layer, index, hidden[m])
        yield index, hidden


def open_streamed(spec: str, *, device: str = "cpu", dtype: str = "float32", weights_dtype: Optional[str] = None,
                  max_layers: Optional[int] = None) -> StreamedModel:
    """A :class:`StreamedModel` over a dense source spec or an upcycle output folder."""
    return StreamedModel(open_source(spec), device=resolve_device(device), dtype=resolve_dtype(dtype),
                         weights_dtype=resolve_dtype(weights_dtype) if weights_dtype else None,
                         max_layers=max_layers)
