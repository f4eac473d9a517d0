"""Gemma 3 (text): Gemma 2 layout with q/k norms and local/global RoPE."""

from .base import DenseFamily

FAMILY = DenseFamily(name="gemma3", model_types=("gemma3_text",), native_target=None,
                     activation_keys=("hidden_activation", "hidden_act"))
