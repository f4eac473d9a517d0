"""Gemma 2: Gemma with sandwich norms, logit soft-capping and alternating sliding windows."""

from .base import DenseFamily

FAMILY = DenseFamily(name="gemma2", model_types=("gemma2",), native_target=None,
                     activation_keys=("hidden_activation", "hidden_act"))
