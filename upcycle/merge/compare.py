"""Which sources equal the base, tensor by tensor (one tensor per source in memory at a time).

A source whose shared (non-FFN) tensors equal the output's shared weights is reproduced exactly when
every token is routed to its expert; when every source equals the base everywhere, the merge is the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SourceMatch:
    """How one source compares with the base: shared tensors, FFN tensors."""

    shared_equal: bool
    ffn_equal: bool


def compare_sources(merged: Any) -> dict[str, SourceMatch]:
    """``source id -> SourceMatch`` against the output's shared weights (the base's, or their average)."""
    shared = {sid: True for sid in merged.sources}
    ffn = {sid: True for sid in merged.sources}
    for name in merged.infos:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        is_ffn = merged.is_ffn(name)
        reference = merged.base.read(name) if is_ffn else merged.read(name)
        for sid, source in merged.sources.items():
            flags = ffn if is_ffn else shared
            if flags[sid]:
                flags[sid] = torch.equal(source.read(name), reference)
        del reference
    return {sid: SourceMatch(shared[sid], ffn[sid]) for sid in merged.sources}
