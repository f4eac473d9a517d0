"""OLMo 2: Llama-style gated FFN with post-norms and q/k RMSNorm."""

from .base import DenseFamily

FAMILY = DenseFamily(name="olmo2", model_types=("olmo2",), native_target="flex_olmo")
