"""The bundled upcycled MoE model: a dense transformers causal LM whose chosen MLPs are MoE blocks.

Self-contained: imports only torch and transformers, so the file is copied into checkpoints and loads
with ``trust_remote_code=True`` where upcycle is not installed.

``UpcycleMoeForCausalLM`` builds the dense family's own ``*ForCausalLM`` from ``config.text_config`` and
adopts its top-level modules as its own children, so every state-dict key outside the MoE blocks is the
dense model's key and attention, norms and positions are the dense model's code. The MLP of each layer in
``config.moe_layers`` is replaced by an :class:`UpcycleMoeBlock`::

    <layers_module>.<i>.<mlp_module>.router.weight                        [E, H]
    <layers_module>.<i>.<mlp_module>.experts.<e>.gate_proj.{weight,bias}  [F, H] (gated MLPs only)
    <layers_module>.<i>.<mlp_module>.experts.<e>.up_proj.{weight,bias}    [F, H]
    <layers_module>.<i>.<mlp_module>.experts.<e>.down_proj.{weight,bias}  [H, F]
    <layers_module>.<i>.<mlp_module>.shared_experts.{gate,up,down}_proj.* (when shared width > 0)
    <layers_module>.<i>.<mlp_module>.shared_expert_gate.weight            [1, H] (when gated)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_upcycle_moe import UpcycleMoeConfig


class UpcycleMoeExpert(nn.Module):
    """One feed-forward expert: ``down(act(gate(x)) * up(x))``, or ``down(act(up(x)))`` when not gated."""

    def __init__(self, hidden_size: int, width: int, gated: bool, bias: bool, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class UpcycleMoeBlock(nn.Module):
    """Router + routed experts (+ optional shared expert), a drop-in replacement for a dense MLP.

    Routing runs in fp32. Tokens are grouped by expert with one sort, so each expert runs once on a
    contiguous slice of its tokens (no per-token loop). ``router_logits_sink``, when a list, receives the
    router logits of each call (the model sets it for the auxiliary losses).
    """

    def __init__(self, config: UpcycleMoeConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        act = config.expert_activation
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router_type = config.router_type
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.dropout = config.mlp_dropout
        self.router = nn.Linear(hidden, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            UpcycleMoeExpert(hidden, config.moe_intermediate_size, config.mlp_gated, config.mlp_bias, act)
            for _ in range(config.num_experts))
        shared = config.shared_expert_intermediate_size
        self.shared_experts = (UpcycleMoeExpert(hidden, shared, config.mlp_gated, config.mlp_bias, act)
                               if shared else None)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared and config.shared_expert_gated else None
        self.router_logits_sink: Optional[list] = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 router logits [T, E], top-k weights [T, k] and expert ids [T, k]."""
        logits = F.linear(x.float(), self.router.weight.float())
        scores = logits.softmax(-1) if self.router_type == "softmax" else logits.sigmoid()
        weights, ids = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return logits, weights * self.routed_scaling_factor, ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        if self.router_logits_sink is not None:
            self.router_logits_sink.append(logits)
        out = self.dispatch(x, weights, ids)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        out = F.dropout(out, p=self.dropout, training=self.training)
        return out.reshape(shape)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum of ``weight * expert(x)`` over each token's chosen experts, grouped by expert."""
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        picked = x.index_select(0, tokens)
        slot_weights = weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        results = torch.empty_like(picked)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                results[start:start + count] = expert(picked[start:start + count])
                start += count
        results = (results.float() * slot_weights).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, results)


def _get_path(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, router_type: str,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``, averaged over MoE layers.

    ``f_e`` is the fraction of routed slots that go to expert ``e``, ``P_e`` its mean routing probability;
    padding tokens (``attention_mask == 0``) are left out.
    """
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = logits.softmax(-1) if router_type == "softmax" else logits.sigmoid()
        if router_type != "softmax":
            probs = probs / probs.sum(-1, keepdim=True)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()
        mask = _token_mask(attention_mask, logits)
        denom = mask.sum().clamp_min(1.0)
        fraction = (chosen * mask).sum(0) / (denom * top_k)
        mean_prob = (probs * mask).sum(0) / denom
        losses.append(num_experts * (fraction * mean_prob).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: list[torch.Tensor], attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the router logits."""
    losses = []
    for logits in router_logits:
        mask = _token_mask(attention_mask, logits)
        z = torch.logsumexp(logits, dim=-1, keepdim=True) ** 2
        losses.append((z * mask).sum() / mask.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def _token_mask(attention_mask: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """[T, 1] float mask of real tokens for flattened router logits (all ones when unknown)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != logits.shape[0]:
        return logits.new_ones(logits.shape[0], 1)
    return attention_mask.reshape(-1, 1).to(logits.dtype)


# Native MoE checkpoints: dense model_type, key renames, and how to read the MoE settings.
_NATIVE_KEYS = {
    "mixtral": {r"block_sparse_moe\.gate\.": "mlp.router.", r"block_sparse_moe\.experts\.": "mlp.experts.",
                r"\.w1\.": ".gate_proj.", r"\.w2\.": ".down_proj.", r"\.w3\.": ".up_proj."},
    "qwen2_moe": {r"mlp\.gate\.weight": "mlp.router.weight", r"mlp\.shared_expert\.": "mlp.shared_experts."},
    "qwen3_moe": {r"mlp\.gate\.weight": "mlp.router.weight"},
}
_NATIVE_DENSE = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}


def _qwen_moe_layers(cfg) -> list[int]:
    step, dense_only = cfg.decoder_sparse_step or 1, set(cfg.mlp_only_layers or [])
    return [i for i in range(cfg.num_hidden_layers)
            if i not in dense_only and cfg.num_experts > 0 and (i + 1) % step == 0]


def native_moe_settings(cfg) -> dict:
    """UpcycleMoeConfig fields equivalent to a native Mixtral / Qwen2-MoE / Qwen3-MoE config."""
    if cfg.model_type == "mixtral":
        return {"num_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                "moe_intermediate_size": cfg.intermediate_size, "norm_topk_prob": True,
                "moe_layers": list(range(cfg.num_hidden_layers))}
    return {"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": bool(cfg.norm_topk_prob),
            "moe_layers": _qwen_moe_layers(cfg),
            "shared_expert_intermediate_size": getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
            "shared_expert_gated": cfg.model_type == "qwen2_moe"}


def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs}


def _dense_model_type(path, kwargs: dict) -> Optional[str]:
    from transformers import PreTrainedConfig

    cfg, _ = PreTrainedConfig.get_config_dict(path, **_hub_kwargs(kwargs))
    return (cfg.get("text_config") or {}).get("model_type")


def dense_key_renames(dense_model_type: Optional[str]) -> dict[str, str]:
    """The renames transformers applies when loading the dense ``*ForCausalLM`` (e.g. GPT-NeoX
    ``embed_out.`` -> ``lm_head.``); the bundled model applies them too, as it holds the same modules."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(dense_model_type or "")
    renames = {}
    for transform in get_checkpoint_conversion_mapping(class_name) or [] if class_name else []:
        sources, targets = transform.source_patterns, transform.target_patterns
        sources, targets = ([sources] if isinstance(sources, str) else sources), (
            [targets] if isinstance(targets, str) else targets)
        if type(transform) is WeightRenaming and len(sources) == len(targets) == 1:
            renames[sources[0]] = targets[0]
    return renames


def native_checkpoint_config(path, kwargs: dict):
    """``(UpcycleMoeConfig, key_mapping)`` for a native MoE checkpoint at ``path``, else None."""
    import dataclasses

    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg, _ = PreTrainedConfig.get_config_dict(path, **_hub_kwargs(kwargs))
    model_type = cfg.get("model_type")
    if model_type not in _NATIVE_DENSE:
        return None
    native = CONFIG_MAPPING[model_type](**{k: v for k, v in cfg.items() if k != "model_type"})
    dense_cls = CONFIG_MAPPING[_NATIVE_DENSE[model_type]]
    names = {f.name for f in dataclasses.fields(dense_cls)} - {"architectures", "transformers_version", "dtype"}
    text = dense_cls(**{k: v for k, v in native.to_dict().items() if k in names})
    config = UpcycleMoeConfig(text_config=text, hidden_act=native.hidden_act, mlp_gated=True,
                              tie_word_embeddings=bool(native.tie_word_embeddings),
                              router_aux_loss_coef=native.router_aux_loss_coef, dtype=native.dtype,
                              **native_moe_settings(native))
    return config, _NATIVE_KEYS[model_type]


class UpcycleMoePreTrainedModel(PreTrainedModel):
    config_class = UpcycleMoeConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class UpcycleMoeForCausalLM(UpcycleMoePreTrainedModel, GenerationMixin):
    """The dense family's ``*ForCausalLM`` with MoE blocks in ``config.moe_layers``.

    ``from_pretrained`` also reads the native Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints that upcycle
    writes (their keys are renamed on load).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an ``upcycle_moe`` checkpoint, or a native Mixtral / Qwen2-MoE / Qwen3-MoE one."""
        config = kwargs.get("config")
        if config is None:
            native = native_checkpoint_config(pretrained_model_name_or_path, kwargs)
            if native is not None:
                kwargs["config"], key_mapping = native
                kwargs.setdefault("key_mapping", key_mapping)
                return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if "key_mapping" not in kwargs:
            dense_type = (config.text_config.model_type if isinstance(config, UpcycleMoeConfig)
                          else _dense_model_type(pretrained_model_name_or_path, kwargs))
            kwargs["key_mapping"] = dense_key_renames(dense_type) or None
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def __init__(self, config: UpcycleMoeConfig):
        super().__init__(config)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        dense_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
        dense = dense_cls(config.text_config)
        # The dense model is not a child: its top-level modules are, so the keys stay the dense ones.
        object.__setattr__(self, "dense", dense)
        for name, child in list(dense.named_children()):
            self.add_module(name, child)
        self._tied_weights_keys = dict(getattr(dense, "_tied_weights_keys", None) or {})
        self._no_split_modules = getattr(dense, "_no_split_modules", None)
        layers = _get_path(dense, config.layers_module)
        for index in config.moe_layers:
            setattr(layers[index], config.mlp_module, UpcycleMoeBlock(config))
        self.post_init()

    @property
    def moe_blocks(self) -> list[UpcycleMoeBlock]:
        return [m for m in self.modules() if isinstance(m, UpcycleMoeBlock)]

    def _init_weights(self, module):
        self.dense._init_weights(module)  # the dense family's init, with its initializer_range

    def train(self, mode: bool = True):
        super().train(mode)
        self.dense.training = mode
        return self

    def get_input_embeddings(self):
        return self.dense.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.dense.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.dense.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.dense.set_output_embeddings(value)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.dense.prepare_inputs_for_generation(*args, **kwargs)

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, output_router_logits: Optional[bool] = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        want_router = self.config.output_router_logits if output_router_logits is None else output_router_logits
        sink: Optional[list] = [] if want_router else None
        blocks = self.moe_blocks
        for block in blocks:
            block.router_logits_sink = sink
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        kwargs["return_dict"] = True
        try:
            out = self.dense(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            for block in blocks:
                block.router_logits_sink = None
        loss, aux_loss, z_loss = out.loss, None, None
        if sink:
            aux_loss = load_balancing_loss(sink, self.config.num_experts_per_tok, self.config.router_type,
                                           attention_mask)
            z_loss = router_z_loss(sink, attention_mask)
            if loss is not None:
                loss = (loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                        + self.config.router_z_loss_coef * z_loss.to(loss.device))
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=out.logits,
                                         past_key_values=getattr(out, "past_key_values", None),
                                         hidden_states=getattr(out, "hidden_states", None),
                                         attentions=getattr(out, "attentions", None),
                                         router_logits=tuple(sink) if sink else None)


__all__ = ["UpcycleMoeForCausalLM", "UpcycleMoePreTrainedModel", "UpcycleMoeBlock", "UpcycleMoeExpert"]
