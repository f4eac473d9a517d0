"""Qwen2 / Qwen2.5: Llama layout with q/k/v biases and per-layer sliding windows."""

from .base import DenseFamily

FAMILY = DenseFamily(name="qwen2", model_types=("qwen2",), native_target="qwen2_moe")
