"""Llama (1/2/3, SmolLM, TinyLlama, ...): gated SiLU FFN under ``model.layers.N.mlp``."""

from .base import DenseFamily

FAMILY = DenseFamily(name="llama", model_types=("llama",), native_target="mixtral")
