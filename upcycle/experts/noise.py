"""``--noise-std``: Gaussian noise on every routed expert copy, to break the symmetry between copies."""

import dataclasses

import torch

from .base import LayerExperts


def add_noise(layer: LayerExperts, std: float, generator: torch.Generator) -> LayerExperts:
    """The same experts, each with independent N(0, std^2) noise added to its weights (not exact)."""
    if not std:
        return layer
    experts = []
    for sl in layer.experts:
        seed = sl.seed or int(torch.randint(2**62, (1,), generator=generator))
        experts.append(dataclasses.replace(sl, noise_std=float(std), seed=seed))
    return dataclasses.replace(layer, experts=experts, exact=False)
