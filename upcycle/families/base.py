"""A dense decoder family described as data: where its FFN weights live and what they look like."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class DenseFamily:
    """How to find the FFN of each decoder layer in a dense checkpoint.

    ``mlp`` maps a projection role (``gate``, ``up``, ``down``) to the module path inside layer ``i``.
    ``native_target`` is the transformers MoE target that ``--target auto`` picks.
    """

    name: str
    model_types: tuple[str, ...]
    native_target: Optional[str]
    layer_prefix: str = "model.layers.{i}."
    mlp: dict[str, str] = field(default_factory=lambda: {"gate": "mlp.gate_proj", "up": "mlp.up_proj",
                                                          "down": "mlp.down_proj"})
    notes: str = ""

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(config["num_hidden_layers"])

    def intermediate_size(self, config: dict[str, Any]) -> int:
        return int(config["intermediate_size"])

    def mlp_key(self, layer: int, proj: str, kind: str = "weight") -> str:
        return f"{self.layer_prefix.format(i=layer)}{self.mlp[proj]}.{kind}"

    def mlp_role(self, key: str) -> Optional[tuple[int, str, str]]:
        """Return ``(layer, projection, weight|bias)`` when ``key`` is an FFN tensor, else None."""
        match = self._mlp_pattern().fullmatch(key)
        if not match:
            return None
        path = match.group("path")
        for proj, module in self.mlp.items():
            if path == module:
                return int(match.group("layer")), proj, match.group("kind")
        return None

    def _mlp_pattern(self) -> re.Pattern[str]:
        prefix = re.escape(self.layer_prefix).replace(re.escape("{i}"), r"(?P<layer>\d+)")
        modules = "|".join(re.escape(m) for m in self.mlp.values())
        return re.compile(prefix + rf"(?P<path>{modules})\.(?P<kind>weight|bias)")
