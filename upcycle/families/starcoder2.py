"""StarCoder2: non-gated GeLU FFN (c_fc, c_proj) with biases, LayerNorm, sliding window."""

from .base import DenseFamily

FAMILY = DenseFamily(name="starcoder2", model_types=("starcoder2",), native_target=None,
                     mlp={"up": "mlp.c_fc", "down": "mlp.c_proj"}, mlp_dropout_key="residual_dropout")
