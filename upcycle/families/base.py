"""A dense decoder family described as data: where its FFN weights live and what they look like."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..io.safetensors_format import TensorInfo

PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class SourceView:
    """A canonical dense tensor that the checkpoint stores inside a fused one: rows ``[start, stop)``
    of ``fused`` (e.g. Phi-3's ``q_proj`` inside ``qkv_proj``)."""

    fused: str
    start: int
    stop: int

    def read(self, fused: "torch.Tensor") -> "torch.Tensor":
        return fused.narrow(0, self.start, self.stop - self.start).contiguous()


#: ``split(config, key, shape)`` -> ``[(canonical_key, start, stop), ...]`` for a fused tensor, else None
FusedSplit = Callable[[dict[str, Any], str, tuple[int, ...]], Optional[list[tuple[str, int, int]]]]


@dataclass(frozen=True)
class DenseFamily:
    """How to find the FFN of each decoder layer in a dense checkpoint.

    ``mlp`` maps a projection role (``gate``, ``up``, ``down``) to the module path inside layer ``i``.
    ``native_target`` is the transformers MoE target that ``--target auto`` picks.
    ``split_fused`` presents fused checkpoint tensors under canonical (split) names; see :meth:`present`.
    """

    name: str
    model_types: tuple[str, ...]
    native_target: Optional[str]
    layer_prefix: str = "model.layers.{i}."
    mlp: dict[str, str] = field(default_factory=lambda: {"gate": "mlp.gate_proj", "up": "mlp.up_proj",
                                                          "down": "mlp.down_proj"})
    split_fused: Optional[FusedSplit] = None
    notes: str = ""
    #: how FFN matrices are stored: "linear" ([out, in], nn.Linear) or "conv1d" ([in, out], GPT-2's Conv1D)
    mlp_layout: str = "linear"
    #: dense config keys naming the FFN activation, first found wins
    activation_keys: tuple[str, ...] = ("hidden_act",)
    #: dense config key of the dropout the MLP applies to its output while training, if any
    mlp_dropout_key: Optional[str] = None

    def present(self, config: dict[str, Any], infos: dict[str, "TensorInfo"]
                ) -> tuple[dict[str, "TensorInfo"], dict[str, SourceView]]:
        """The checkpoint under canonical names: fused tensors are replaced, in place, by their parts.

        Returns the new ``infos`` and the views that read each part from its fused tensor.
        """
        if self.split_fused is None:
            return infos, {}
        out: dict[str, "TensorInfo"] = {}
        views: dict[str, SourceView] = {}
        for key, info in infos.items():
            parts = self.split_fused(config, key, info.shape)
            if not parts:
                out[key] = info
                continue
            for name, start, stop in parts:
                views[name] = SourceView(key, start, stop)
                out[name] = dataclasses.replace(info, shape=(stop - start, *info.shape[1:]), start=0, end=0)
        return out, views

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(_first(config, ("num_hidden_layers", "n_layer")))

    def hidden_size(self, config: dict[str, Any]) -> int:
        return int(_first(config, ("hidden_size", "n_embd")))

    def max_positions(self, config: dict[str, Any]) -> Optional[int]:
        """The longest sequence the dense model takes, when its config says (GPT-2: ``n_positions``)."""
        value = next((config[k] for k in ("max_position_embeddings", "n_positions") if config.get(k)), None)
        return int(value) if value else None

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

        ``read(key)`` returns a tensor under its canonical name (fused ones are split by :meth:`present`'s
        views); Conv1D weights are transposed here.
        """
        tensor = read(self.mlp_key(layer, proj, kind))
        return tensor.t() if kind == "weight" and self.mlp_layout == "conv1d" else tensor

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
