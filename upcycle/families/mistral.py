"""Mistral: Llama layout with a sliding attention window."""

from .base import DenseFamily

FAMILY = DenseFamily(name="mistral", model_types=("mistral",), native_target="mixtral")
