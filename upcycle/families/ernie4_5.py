"""Baidu ERNIE 4.5 (dense, 0.3B): Llama MLP; one ``use_bias`` switch for attention, MLP and head biases."""

from .base import DenseFamily

FAMILY = DenseFamily(name="ernie4_5", model_types=("ernie4_5",), native_target="ernie4_5_moe")
