"""Phi-1/1.5/2: non-gated GeLU FFN (fc1, fc2) with biases, parallel attention, partial rotary."""

from .base import DenseFamily

FAMILY = DenseFamily(name="phi", model_types=("phi",), native_target=None, mlp={"up": "mlp.fc1", "down": "mlp.fc2"})
