"""What data-aware methods may read about one dense layer: its FFN matrices and calibration statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass
class LayerData:
    """Dense data of one layer, given to methods and router inits at conversion time (None in a dry run).

    ``weight(proj)`` reads one of the dense ``projections`` as float32 in nn.Linear orientation
    (gate/up ``[F, H]``, down ``[H, F]``); non-gated FFNs have no ``gate``. Calibration statistics are
    present only when the recipe asked for them.
    """

    weight: Callable[[str], torch.Tensor]
    #: [F, d] random-projection sketch of each neuron's activations over the calibration tokens
    activation_sketch: Optional[torch.Tensor] = None
    #: [F] mean squared activation of each neuron
    activation_energy: Optional[torch.Tensor] = None
    #: [rows, hidden] k-means centroids of the hidden states entering the layer's FFN
    hidden_centroids: Optional[torch.Tensor] = None
    #: the FFN's projections, inputs first: ``("gate", "up", "down")``, or ``("up", "down")`` when not gated
    projections: tuple[str, ...] = ("gate", "up", "down")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The projections that read the hidden state (every one but ``down``)."""
        return tuple(p for p in self.projections if p != "down")

    @classmethod
    def from_cache(cls, family: Any, layer: int, cache: Any, **statistics: Any) -> "LayerData":
        """The layer's FFN read through a :class:`~upcycle.tensors.SourceCache` with ``family.ffn_matrix``
        (fused tensors split, Conv1D weights transposed), plus any calibration ``statistics``."""
        return cls(lambda proj: family.ffn_matrix(lambda key: cache.get(key, torch.float32), layer, proj),
                   projections=tuple(family.mlp), **statistics)
