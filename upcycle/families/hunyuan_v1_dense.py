"""Tencent Hunyuan v1 dense: Llama MLP, per-head query/key RMSNorm, explicit ``head_dim``."""

from .base import DenseFamily

FAMILY = DenseFamily(name="hunyuan_v1_dense", model_types=("hunyuan_v1_dense",), native_target="hunyuan_v1_moe")
