"""OLMo 2: Llama MLP, q/k RMSNorm over the whole projection, norms after attention and after the FFN."""

from .base import DenseFamily

FAMILY = DenseFamily(name="olmo2", model_types=("olmo2",), native_target="flex_olmo")
