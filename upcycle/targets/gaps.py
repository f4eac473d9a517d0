"""Known gaps: dense families, or family/target pairs, that upcycle cannot convert to a native target yet.

Plain data, rendered into docs/architectures.md next to what the registry supports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gap:
    dense: str
    moe: str
    reason: str


GAPS = (
    Gap("gemma, gemma2, gemma3, gpt2, gpt_neox, phi, stablelm, starcoder2, olmo, glm4, exaone4", "none",
        "no transformers MoE architecture has their decoder (norms, activations, biases or attention); "
        "they need the bundled upcycle model"),
)
