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
    #: how FFN matrices are stored: "linear" ([out, in], nn.Linear) or "conv1d" ([in, out], GPT-2's Conv1D)
    mlp_layout: str = "linear"
    #: gate and up are one fused [2F, H] matrix, gate rows first (Phi-3 ``gate_up_proj``)
    fused_gate_up: bool = False
    #: dense config keys naming the FFN activation, first found wins
    activation_keys: tuple[str, ...] = ("hidden_act",)
    #: dense config key of the dropout the MLP applies to its output while training, if any
    mlp_dropout_key: Optional[str] = None

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(_first(config, ("num_hidden_layers", "n_layer")))

    def hidden_size(self, config: dict[str, Any]) -> int:
        return int(_first(config, ("hidden_size", "n_embd")))

    def intermediate_size(self, config: dict[str, Any]) -> int:
        size = config.get("intermediate_size") or config.get("n_inner")
        return int(size) if size else 4 * self.hidden_size(config)

    @property
    def gated(self) -> bool:
        """True for ``down(act(gate(x)) * up(x))`` FFNs, False for ``down(act(up(x)))``."""
        return "gate" in self.mlp

    @property
    def layers_module(self) -> str:
        """Dotted path of the decoder-layer list (``model.layers``)."""
        return self.layer_prefix.split(".{i}")[0]

    @property
    def mlp_module(self) -> str:
        """Attribute path of the MLP inside a decoder layer (``mlp``)."""
        return self.mlp["down"].rsplit(".", 1)[0]

    def activation(self, config: dict[str, Any]) -> str:
        return str(_first(config, self.activation_keys))

    def ffn_matrix(self, read, layer: int, proj: str, kind: str = "weight"):
        """A projection's dense weight in nn.Linear orientation (gate/up [F, H], down [H, F]) or its bias.

        ``read(key)`` returns a stored tensor; Conv1D weights are transposed and fused gate/up split here.
        """
        tensor = read(self.mlp_key(layer, proj, kind))
        if kind == "weight" and self.mlp_layout == "conv1d":
            tensor = tensor.t()
        if self.fused_gate_up and proj in ("gate", "up"):
            half = tensor.shape[0] // 2
            tensor = tensor[:half] if proj == "gate" else tensor[half:]
        return tensor

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


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise KeyError(f"the config has none of {', '.join(keys)}")
