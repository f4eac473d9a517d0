"""Layer selection (``--layers``): which decoder layers become MoE layers."""

from __future__ import annotations

import re

from .errors import RecipeError

_EVERY = re.compile(r"every:(\d+)")
_ITEM = re.compile(r"(\d+)(?:-(\d+))?")
HELP = "use all, every:N (layer i when (i+1) % N == 0), a list such as 0,2,5 or a range such as 4-11"


def check_layer_spec(spec: object) -> str:
    """Normalise a layer spec (a list of ints is accepted from recipe files) and check its syntax."""
    if isinstance(spec, bool):
        raise RecipeError(f"--layers: cannot read {spec!r}; {HELP}")
    if isinstance(spec, int):
        spec = str(spec)
    elif isinstance(spec, (list, tuple)):
        spec = ",".join(str(x) for x in spec)
    text = str(spec).strip().replace(" ", "")
    if text == "all":
        return text
    match = _EVERY.fullmatch(text)
    if match:
        if int(match.group(1)) < 1:
            raise RecipeError(f"--layers {text}: N must be >= 1")
        return text
    for item in text.split(","):
        m = _ITEM.fullmatch(item)
        if not m:
            raise RecipeError(f"--layers: cannot read {spec!r}; {HELP}")
        if m.group(2) is not None and int(m.group(2)) < int(m.group(1)):
            raise RecipeError(f"--layers: range {item} runs backwards")
    return text


def select_layers(spec: str, num_layers: int) -> list[int]:
    """The sorted MoE layer indices that ``spec`` names in a model of ``num_layers`` layers."""
    text = check_layer_spec(spec)
    if text == "all":
        return list(range(num_layers))
    match = _EVERY.fullmatch(text)
    if match:
        step = int(match.group(1))
        layers = [i for i in range(num_layers) if (i + 1) % step == 0]
    else:
        chosen: set[int] = set()
        for item in text.split(","):
            m = _ITEM.fullmatch(item)
            first = int(m.group(1))
            last = int(m.group(2) or first)
            if last >= num_layers:  # checked before the range is built: 0-10**15 must not fill the memory
                raise RecipeError(f"--layers {text}: the model has {num_layers} layers (0-{num_layers - 1}); "
                                  f"no layer {first if first >= num_layers else num_layers}")
            chosen.update(range(first, last + 1))
        layers = sorted(chosen)
    if not layers:
        raise RecipeError(f"--layers {text} selects no layer of this {num_layers}-layer model")
    return layers
