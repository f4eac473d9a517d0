"""Microsoft Phi-3 / Phi-3.5 / Phi-4-mini: Llama layout with fused ``qkv_proj`` and ``gate_up_proj``.

The checkpoint is presented under Llama names (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``):
each part is a row slice of the fused tensor, read through a :class:`SourceView`.
"""

from __future__ import annotations

from typing import Any, Optional

from .base import DenseFamily


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def split_fused(cfg: dict[str, Any], key: str, shape: tuple[int, ...]) -> Optional[list[tuple[str, int, int]]]:
    """``qkv_proj`` -> q, k, v rows; ``gate_up_proj`` -> gate rows then up rows (Phi3MLP chunks in that order)."""
    module, _, kind = key.rpartition(".")
    if module.endswith("self_attn.qkv_proj"):
        base = module[: -len("qkv_proj")]
        q = int(cfg["num_attention_heads"]) * _head_dim(cfg)
        kv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]) * _head_dim(cfg)
        return [(f"{base}q_proj.{kind}", 0, q), (f"{base}k_proj.{kind}", q, q + kv),
                (f"{base}v_proj.{kind}", q + kv, q + 2 * kv)]
    if module.endswith("mlp.gate_up_proj"):
        base, half = module[: -len("gate_up_proj")], shape[0] // 2
        return [(f"{base}gate_proj.{kind}", 0, half), (f"{base}up_proj.{kind}", half, 2 * half)]
    return None


FAMILY = DenseFamily(name="phi3", model_types=("phi3",), native_target="mixtral", split_fused=split_fused)
