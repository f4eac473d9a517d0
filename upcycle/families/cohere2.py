"""Cohere Command R7B / A (cohere2): parallel attention+MLP block, LayerNorm, sliding layers with RoPE
and full-attention layers without it (``layer_types``)."""

from .base import DenseFamily

FAMILY = DenseFamily(name="cohere2", model_types=("cohere2",), native_target="cohere2_moe")
