"""Qwen3: Llama layout with q/k RMSNorm and an explicit ``head_dim``."""

from .base import DenseFamily

FAMILY = DenseFamily(name="qwen3", model_types=("qwen3",), native_target="qwen3_moe")
