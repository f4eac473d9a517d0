"""Gemma: gated GeLU-tanh FFN, (1 + w) RMSNorm, scaled embeddings; no native MoE counterpart."""

from .base import DenseFamily

FAMILY = DenseFamily(name="gemma", model_types=("gemma",), native_target=None)
