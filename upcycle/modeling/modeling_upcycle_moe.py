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

In memory the routed experts of a block are one :class:`UpcycleMoeExperts` module holding stacked tensors in
transformers' fused layout (``gate_up_proj [E, 2F, H]`` or ``up_proj [E, F, H]``, ``down_proj [E, H, F]``,
biases ``[E, 2F]``/``[E, F]``/``[E, H]``), so it runs on transformers' own experts implementations
(``transformers.integrations.moe``: ``eager`` = this file's grouped loop, ``grouped_mm``, ``batched_mm`` and
kernels registered with ``ExpertsInterface``), chosen by ``experts_implementation=`` at load time or
``model.set_experts_implementation``. transformers' weight-conversion mechanism (the one that fuses Mixtral's
per-expert keys) maps the per-expert keys above to the fused tensors on load and back on save, so checkpoints
keep the per-expert layout.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .configuration_upcycle_moe import UpcycleMoeConfig


class UpcycleMoeExpert(nn.Module):
    """One feed-forward expert: ``down(act(gate(x)) * up(x))``, or ``down(act(up(x)))`` when not gated.

    The shared expert is one; ``UpcycleMoeExperts[e]`` returns another whose weights are views of the
    fused tensors (for inspection and in-place edits such as ``load_state_dict``, not for training).
    """

    def __init__(self, hidden_size: int, width: int, gated: bool, bias: bool, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    @classmethod
    def of_tensors(cls, gate: Optional[tuple], up: tuple, down: tuple, act_fn) -> "UpcycleMoeExpert":
        """An expert over existing ``(weight, bias)`` tensors, sharing their storage."""
        expert = cls.__new__(cls)
        nn.Module.__init__(expert)
        expert.gate_proj = _linear_over(*gate) if gate is not None else None
        expert.up_proj, expert.down_proj, expert.act_fn = _linear_over(*up), _linear_over(*down), act_fn
        return expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


def _linear_over(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An ``nn.Linear`` whose parameters alias ``weight`` and ``bias`` (nothing is allocated or copied)."""
    linear = nn.Linear(1, 1, bias=False, device="meta")
    linear.out_features, linear.in_features = weight.shape
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
    return linear


@use_experts_implementation
class _FusedExperts(nn.Module):
    """The routed experts of one block as stacked tensors, run by ``config._experts_implementation``.

    ``forward`` here is the ``eager`` implementation: one stable sort groups the (token, expert) slots by
    expert, each expert runs once on its contiguous slice, and the weighted outputs are summed per token in
    fp32. The other implementations come from ``transformers.integrations.moe``.
    """

    def __init__(self, config: UpcycleMoeConfig):
        super().__init__()
        hidden, width, experts = config.text_config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.num_experts, self.hidden_dim, self.intermediate_dim = experts, hidden, width
        gated, bias = config.mlp_gated, config.mlp_bias
        up_name = "gate_up_proj" if gated else "up_proj"
        up_rows = 2 * width if gated else width
        self.register_parameter(up_name, nn.Parameter(torch.empty(experts, up_rows, hidden)))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, width))
        if bias:
            self.register_parameter(up_name + "_bias", nn.Parameter(torch.empty(experts, up_rows)))
            self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden))
        self.act_fn = ACT2FN[config.expert_activation]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.eager_forward(hidden_states, top_k_index, top_k_weights)

    def eager_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of ``weight * expert(token)``, grouped by expert."""
        top_k = top_k_index.shape[-1]
        flat_ids = top_k_index.reshape(-1)
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        tokens = order // top_k if top_k > 1 else order
        picked = hidden_states.index_select(0, tokens)
        results = torch.empty_like(picked)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                results[start:start + count] = self.expert_forward(expert, picked[start:start + count])
                start += count
        slot_weights = top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        weighted = results.float() * slot_weights
        if top_k == 1:  # each token has one slot: scatter without a sum
            return torch.empty_like(weighted).index_copy_(0, tokens, weighted).to(hidden_states.dtype)
        return weighted.new_zeros(hidden_states.shape).index_add_(0, tokens, weighted).to(hidden_states.dtype)

    def _tensors(self, expert: int) -> tuple[Optional[tuple], tuple, tuple]:
        """``(gate, up, down)`` ``(weight, bias)`` slices of one expert (gate None when not gated)."""
        down = (self.down_proj[expert], self.down_proj_bias[expert] if self.has_bias else None)
        if not self.has_gate:
            return None, (self.up_proj[expert], self.up_proj_bias[expert] if self.has_bias else None), down
        width = self.intermediate_dim
        weight, bias = self.gate_up_proj[expert], self.gate_up_proj_bias[expert] if self.has_bias else None
        halves = [(weight[i * width:(i + 1) * width], bias[i * width:(i + 1) * width] if bias is not None else None)
                  for i in (0, 1)]
        return halves[0], halves[1], down

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens ``x`` [n, H]."""
        down_w = self.down_proj[expert]
        down_b = self.down_proj_bias[expert] if self.has_bias else None
        if self.has_gate:
            gate_up = F.linear(x, self.gate_up_proj[expert], self.gate_up_proj_bias[expert] if self.has_bias else None)
            gate, up = gate_up.chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, down_w, down_b)
        up = F.linear(x, self.up_proj[expert], self.up_proj_bias[expert] if self.has_bias else None)
        return F.linear(self.act_fn(up), down_w, down_b)

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index):
        """Expert ``index`` as an :class:`UpcycleMoeExpert` over views of the fused tensors (a list for a slice)."""
        if isinstance(index, slice):
            return [self[i] for i in range(self.num_experts)[index]]
        index = range(self.num_experts)[index]
        gate, up, down = self._tensors(index)
        detach = (lambda pair: tuple(t.detach() if t is not None else None for t in pair))
        return UpcycleMoeExpert.of_tensors(detach(gate) if gate else None, detach(up), detach(down), self.act_fn)

    def __iter__(self):
        return (self[i] for i in range(self.num_experts))


class UpcycleMoeExperts(_FusedExperts):
    """:class:`_FusedExperts` with the gate and bias layout of ``config`` (the decorator fixes them per class)."""

    def __init__(self, config: UpcycleMoeConfig):
        super().__init__(config)
        self.has_gate, self.has_bias = bool(config.mlp_gated), bool(config.mlp_bias)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if not self.has_gate and not _KERNELS_TAKE_UNGATED:  # older transformers kernels read gate_up_proj
            return self.eager_forward(hidden_states, top_k_index, top_k_weights)
        return super().forward(hidden_states, top_k_index, top_k_weights)


#: transformers >= the release whose experts kernels accept non-gated experts (``has_gate``)
_KERNELS_TAKE_UNGATED = "has_gate" in inspect.signature(use_experts_implementation).parameters


def experts_weight_conversions(config: UpcycleMoeConfig) -> list:
    """transformers weight converters between the per-expert checkpoint keys and the fused tensors.

    The same mechanism fuses Mixtral's ``experts.N.w1/w3`` on load and splits them again on save.
    """
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    # Patterns are regular expressions (``.`` matches any character): anchoring them on the MLP's attribute
    # name keeps ``shared_experts.*`` out of them.
    experts = f"{config.mlp_module}.experts"
    kinds = ("weight", "bias") if config.mlp_bias else ("weight",)
    converters = []
    for kind in kinds:
        suffix = "" if kind == "weight" else "_bias"
        if config.mlp_gated:
            converters.append(WeightConverter(
                source_patterns=[f"{experts}.*.gate_proj.{kind}", f"{experts}.*.up_proj.{kind}"],
                target_patterns=f"{experts}.gate_up_proj{suffix}",
                operations=[MergeModulelist(dim=0), Concatenate(dim=1)]))
        else:
            converters.append(WeightConverter(source_patterns=f"{experts}.*.up_proj.{kind}",
                                              target_patterns=f"{experts}.up_proj{suffix}",
                                              operations=[MergeModulelist(dim=0)]))
        converters.append(WeightConverter(source_patterns=f"{experts}.*.down_proj.{kind}",
                                          target_patterns=f"{experts}.down_proj{suffix}",
                                          operations=[MergeModulelist(dim=0)]))
    return converters


class UpcycleMoeBlock(nn.Module):
    """Router + routed experts (+ optional shared expert), a drop-in replacement for a dense MLP.

    Routing runs in fp32; the routed experts run on the experts implementation the config selects.
    ``router_logits_sink``, when a list, receives the router logits of each call (the model sets it for
    the auxiliary losses).
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
        self.experts = UpcycleMoeExperts(config)
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
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return logits, weights, ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        if self.router_logits_sink is not None:
            self.router_logits_sink.append(logits)
        out = self.experts(x, ids, weights)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        out = F.dropout(out, p=self.dropout, training=self.training)
        return out.reshape(shape)


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


def _init_experts(module: nn.Module, config: UpcycleMoeConfig) -> None:
    """Fused expert tensors: normal(0, initializer_range) weights, zero biases (no-op for other modules)."""
    if not isinstance(module, UpcycleMoeExperts):
        return
    std = getattr(config.text_config, "initializer_range", 0.02)
    for name, param in module.named_parameters(recurse=False):
        if name.endswith("_bias"):
            init.zeros_(param)
        else:
            init.normal_(param, mean=0.0, std=std)


def _also_init_experts(dense_init, config: UpcycleMoeConfig):
    """A dense sub-model's ``_init_weights`` that also initialises the fused experts placed inside it."""
    def init_weights(module):
        dense_init(module)
        _init_experts(module, config)
    return init_weights


class UpcycleMoePreTrainedModel(PreTrainedModel):
    config_class = UpcycleMoeConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def get_correct_experts_implementation(self, requested_experts: Optional[str]) -> str:
        """transformers' choice, except that without a GPU (or other accelerator) the default is ``eager``:
        on CPU the grouped loop is as fast as ``grouped_mm`` or faster (docs/benchmarks.md, issue 15)."""
        if requested_experts is None and not _accelerator_available():
            return "eager"
        return super().get_correct_experts_implementation(requested_experts)


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


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
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        # from_pretrained reads the converters by class name right after building the model: register this
        # config's layout (gated or not, biases or not); save_pretrained reverses the instance's own list.
        conversions = experts_weight_conversions(config)
        for name in (type(self).__name__, config.model_type):  # by class name, or model_type (transformers 5.0)
            register_checkpoint_conversion_mapping(name, conversions, overwrite=True)
        self._weight_conversions = conversions

        dense_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
        # The dense classes have no experts: an implementation requested for this model (and copied into the
        # text config by transformers) is not theirs to check.
        config.text_config._experts_implementation_internal = "eager"
        dense = dense_cls(config.text_config)
        # The dense model is not a child: its top-level modules are, so the keys stay the dense ones.
        object.__setattr__(self, "dense", dense)
        for name, child in list(dense.named_children()):
            self.add_module(name, child)
            if isinstance(child, PreTrainedModel):  # transformers initialises a sub-model's modules with its own
                child._init_weights = _also_init_experts(child._init_weights, config)  # _init_weights
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
        _init_experts(module, self.config)

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

    @property
    def base_model(self):
        """The dense backbone (decoder stack without the LM head) as :class:`UpcycleMoeBackbone`.

        transformers' convention is that ``model.base_model`` returns the last hidden state and, for MoE
        models, the router logits; TRL's fused LM head calls it. (``base_model_prefix`` stays ``""``: the
        state-dict keys are the dense model's.)
        """
        if "dense" not in self.__dict__:  # while PreTrainedModel.__init__ runs
            return self
        return UpcycleMoeBackbone(self)

    @contextlib.contextmanager
    def _router_logits(self, wanted: bool):
        """A list that receives every MoE block's router logits for the duration (None when not ``wanted``)."""
        sink: Optional[list] = [] if wanted else None
        blocks = self.moe_blocks
        for block in blocks:
            block.router_logits_sink = sink
        try:
            yield sink
        finally:
            for block in blocks:
                block.router_logits_sink = None

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, output_router_logits: Optional[bool] = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        want_router = self.config.output_router_logits if output_router_logits is None else output_router_logits
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        kwargs["return_dict"] = True
        with self._router_logits(want_router) as sink:
            out = self.dense(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
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


class UpcycleMoeBackbone:
    """``model.base_model`` of :class:`UpcycleMoeForCausalLM`: the dense family's backbone (``LlamaModel``,
    ``GPT2Model``, ...) whose call also returns the router logits, as ``MoeModelOutputWithPast``.

    Not a module of its own (it holds no weights); other attributes are the dense backbone's.
    """

    def __init__(self, model: UpcycleMoeForCausalLM):
        object.__setattr__(self, "_model", model)

    @property
    def _backbone(self) -> nn.Module:
        return self._model.dense.base_model

    def __getattr__(self, name: str):
        if name == "_model":  # not set yet (copying, unpickling): no recursion through _backbone
            raise AttributeError(name)
        return getattr(self._backbone, name)

    def __call__(self, *args, output_router_logits: Optional[bool] = None, **kwargs) -> MoeModelOutputWithPast:
        model = self._model
        want_router = model.config.output_router_logits if output_router_logits is None else output_router_logits
        kwargs["return_dict"] = True
        with model._router_logits(want_router) as sink:
            out = self._backbone(*args, **kwargs)
        return MoeModelOutputWithPast(last_hidden_state=out.last_hidden_state,
                                      past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None),
                                      router_logits=tuple(sink) if sink else None)

    forward = __call__


__all__ = ["UpcycleMoeForCausalLM", "UpcycleMoeBackbone", "UpcycleMoePreTrainedModel", "UpcycleMoeBlock",
           "UpcycleMoeExpert", "UpcycleMoeExperts", "experts_weight_conversions"]
