"""Router rows for a merge, built from each expert's prompts or domain text.

* ``hidden``: per layer, the mean hidden state that the expert's prompts produce where they enter the FFN
  (dense base model), minus the mean of its negative prompts (see :func:`contrast`);
* ``embed``: the mean input embedding of the prompts' tokens (minus negatives), the same row in every layer;
* ``domain``: per layer, the centroid of the FFN inputs over the expert's calibration text (BTX/FlexOlmo
  route by domain);
* ``uniform``: nn.Linear's default init, U(-1/sqrt(H), 1/sqrt(H)) (mergekit ``uniform_random``).

Rows are then centred (the component every expert shares decides nothing) and scaled to the norm of a
N(0, router_std^2) row; ``normal`` and ``zeros`` are the converter's own router inits.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import RecipeError
from ..routers.base import scale_rows
from .config import MergeConfig
from .probe import FfnInputs, encode_prompts

def finish_rows(rows: torch.Tensor, std: float) -> torch.Tensor:
    """Centre the rows over the experts (when there are several), then give each the norm of a N(0, std^2) row."""
    if rows.shape[0] > 1:
        rows = rows - rows.mean(0, keepdim=True)
    return scale_rows(rows, std)


def contrast(positive: torch.Tensor, negative: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """``[E, H]`` rows: each expert's positive-prompt mean minus its negative prompts' mean; an expert without
    negative prompts is taken against the mean of every expert's positive mean instead.

    Hidden states (and embeddings) share a large component. ``positive - negative`` cancels it, so a row that
    kept it (an expert without negatives) would, after centring, leave minus that component on the rows with
    negatives and route every token away from their experts; taking each row against a reference removes it
    from all rows alike. Without any negative prompt the rows are the positive means (centred later).
    """
    if all(n is None for n in negative):
        return positive
    reference = positive.mean(0)
    return torch.stack([p - (reference if n is None else n) for p, n in zip(positive, negative)])


def _encoded(tokenizer: Any, prompts: tuple[str, ...], where: str) -> list:
    encoded = encode_prompts(tokenizer, prompts)
    if prompts and not encoded:
        raise RecipeError(f"{where}: the prompts give no tokens; give prompts with text")
    return encoded


def hidden_rows(config: MergeConfig, src: Any, family: Any, layers: list[int], tokenizer: Any
                ) -> dict[int, torch.Tensor]:
    """``layer -> [E, H]`` rows from the FFN inputs of each expert's prompts, minus its negative prompts."""
    cache: dict[tuple[str, ...], dict[int, torch.Tensor]] = {}
    per_expert = []
    with FfnInputs(src, family, layers) as model:
        def mean(prompts: tuple[str, ...], where: str) -> dict[int, torch.Tensor]:
            if prompts not in cache:
                cache[prompts] = model.mean(_encoded(tokenizer, prompts, where))
            return cache[prompts]

        for i, expert in enumerate(config.experts):
            negative = (mean(expert.negative_prompts, f"experts[{i}].negative_prompts")
                        if expert.negative_prompts else None)
            per_expert.append((mean(expert.prompts, f"experts[{i}].prompts"), negative))
    return {layer: finish_rows(contrast(torch.stack([p[layer] for p, _ in per_expert]),
                                        [None if n is None else n[layer] for _, n in per_expert]), config.router_std)
            for layer in layers}


def domain_rows(config: MergeConfig, src: Any, family: Any, layers: list[int], tokenizer: Any,
                max_positions: Optional[int]) -> dict[int, torch.Tensor]:
    """``layer -> [E, H]`` rows: the centroid of each expert's calibration-text FFN inputs."""
    from ..calibration import SEQUENCE_LENGTH, tokenize_calibration

    length = min(SEQUENCE_LENGTH, max_positions or SEQUENCE_LENGTH)
    per_expert = []
    with FfnInputs(src, family, layers) as model:
        for i, expert in enumerate(config.experts):
            try:
                ids = tokenize_calibration(expert.calibration, tokenizer, config.calibration_tokens, 1)
            except RecipeError as exc:
                raise RecipeError(f"experts[{i}].calibration: {str(exc).replace('--calibration ', '')}") from None
            per_expert.append(model.mean((seq, torch.ones(seq.numel(), dtype=torch.bool))
                                         for seq in ids.split(length)))
    return {layer: finish_rows(torch.stack([r[layer] for r in per_expert]), config.router_std) for layer in layers}


def embedding_key(cfg: dict[str, Any], infos: dict[str, Any], hidden: int) -> str:
    """The input-embedding tensor: ``[vocab, hidden]``, named like an embedding (``embed``, ``wte``)."""
    vocab = cfg.get("vocab_size")
    for name, info in infos.items():
        if tuple(info.shape) == (vocab, hidden) and ("embed" in name or "wte" in name):
            return name
    raise RecipeError("router_init embed: no input-embedding tensor found in the base checkpoint; "
                      "use router_init hidden")


def embed_rows(config: MergeConfig, read: Callable[[str], torch.Tensor], key: str, layers: list[int],
               tokenizer: Any) -> dict[int, torch.Tensor]:
    """One row per expert from the mean embedding of its prompts' tokens (minus negatives), for every layer."""
    table = read(key).float()

    def mean(prompts: tuple[str, ...], where: str) -> torch.Tensor:
        ids = torch.cat([ids[keep] for ids, keep in _encoded(tokenizer, prompts, where)])
        return table.index_select(0, ids).mean(0)

    positive = torch.stack([mean(e.prompts, f"experts[{i}].prompts") for i, e in enumerate(config.experts)])
    negative = [mean(e.negative_prompts, f"experts[{i}].negative_prompts") if e.negative_prompts else None
                for i, e in enumerate(config.experts)]
    del table
    finished = finish_rows(contrast(positive, negative), config.router_std)
    return {layer: finished for layer in layers}


def uniform_rows(config: MergeConfig, hidden: int, layers: list[int]) -> dict[int, torch.Tensor]:
    """nn.Linear's default init per layer, from a generator seeded with the config's seed and the layer."""
    bound = hidden ** -0.5
    out = {}
    for layer in layers:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + layer * 17 + 1)
        out[layer] = (torch.rand(len(config.experts), hidden, generator=gen) * 2 - 1) * bound
    return out
