"""StableLM: Llama-style gated FFN with LayerNorm, partial rotary and optional qkv bias / q-k norms."""

from .base import DenseFamily

FAMILY = DenseFamily(name="stablelm", model_types=("stablelm",), native_target=None)
