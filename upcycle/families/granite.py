"""IBM Granite (3.x): Llama MLP plus embedding, residual, attention and logit multipliers."""

from .base import DenseFamily

FAMILY = DenseFamily(name="granite", model_types=("granite",), native_target="granitemoe")
