"""What data-aware methods may read about one dense layer: its FFN matrices and calibration statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class LayerData:
    """Dense data of one layer, given to methods and router inits at conversion time (None in a dry run).

    ``weight(proj)`` reads the dense ``gate``/``up``/``down`` matrix as float32. Calibration statistics
    are present only when the recipe asked for them.
    """

    weight: Callable[[str], torch.Tensor]
    #: [F, d] random-projection sketch of each neuron's activations over the calibration tokens
    activation_sketch: Optional[torch.Tensor] = None
    #: [F] mean squared activation of each neuron
    activation_energy: Optional[torch.Tensor] = None
    #: [rows, hidden] k-means centroids of the hidden states entering the layer's FFN
    hidden_centroids: Optional[torch.Tensor] = None
