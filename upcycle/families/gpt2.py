"""GPT-2: non-gated GeLU FFN in Conv1D layout (weights stored [in, out]) with biases, under ``transformer.h.N``."""

from .base import DenseFamily

FAMILY = DenseFamily(name="gpt2", model_types=("gpt2",), native_target=None, layer_prefix="transformer.h.{i}.",
                     mlp={"up": "mlp.c_fc", "down": "mlp.c_proj"}, mlp_layout="conv1d",
                     activation_keys=("activation_function",), mlp_dropout_key="resid_pdrop")
