"""Phi-3 / Phi-4-mini: gated SiLU FFN with gate and up fused in ``gate_up_proj`` (gate rows first)."""

from .base import DenseFamily

FAMILY = DenseFamily(name="phi3", model_types=("phi3",), native_target="mixtral",
                     mlp={"gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
                     fused_gate_up=True)
