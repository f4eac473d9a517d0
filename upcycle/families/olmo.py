"""OLMo: Llama-style gated FFN with non-parametric LayerNorm and optional qkv clipping."""

from .base import DenseFamily

FAMILY = DenseFamily(name="olmo", model_types=("olmo",), native_target=None)
