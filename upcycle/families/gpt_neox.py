"""GPT-NeoX / Pythia: non-gated GeLU FFN with biases, fused qkv, partial rotary, parallel residual."""

from .base import DenseFamily

FAMILY = DenseFamily(name="gpt_neox", model_types=("gpt_neox",), native_target=None,
                     layer_prefix="gpt_neox.layers.{i}.", mlp={"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"})
