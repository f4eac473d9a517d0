"""Where and in what precision the runner computes: ``--device`` and ``--dtype`` resolution, the layer cap."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import RecipeError, UpcycleError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")
#: environment setting: the most decoder layers one streamed model may hold at once
MAX_LAYERS_ENV = "UPCYCLE_MAX_RESIDENT_LAYERS"


class LayerCapError(UpcycleError):
    """The runner was asked to hold more decoder layers than the memory cap allows."""


def resolve_dtype(name: str) -> torch.dtype:
    """``float32|bfloat16|float16`` -> torch dtype; a clear error for anything else."""
    if name not in DTYPES:
        raise RecipeError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device must be usable by torch here."""
    base = name.split(":")[0]
    if base not in DEVICES:
        raise RecipeError(f"--device {name!r} is not a device: use one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise RecipeError(f"--device {name!r} cannot be used: {str(exc).splitlines()[0]}") from None
    return device


def layer_cap(requested: Optional[int] = None) -> Optional[int]:
    """The cap on resident decoder layers per model: the argument, else the environment setting, else none."""
    value = requested if requested is not None else os.environ.get(MAX_LAYERS_ENV)
    if value in (None, ""):
        return None
    try:
        cap = int(value)
    except ValueError:
        raise RecipeError(f"{MAX_LAYERS_ENV} must be a whole number of layers, got {value!r}") from None
    if cap < 1:
        raise RecipeError(f"the layer cap must be at least 1, got {cap}")
    return cap
