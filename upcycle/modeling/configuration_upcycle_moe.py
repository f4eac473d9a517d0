"""Configuration of the bundled upcycled MoE model (``model_type: upcycle_moe``).

Self-contained: imports only transformers, so the file is copied into checkpoints and loads with
``trust_remote_code=True`` where upcycle is not installed.

The dense model's own config is kept whole under ``text_config`` (with its ``model_type``); the fields
below say which layers are MoE and what their experts look like.

``config.get_text_config()`` is that dense config (transformers reads the vocabulary, layer count, cache
and attention settings there). Trainers built on transformers look for the MoE settings there too (TRL's
``SFTTrainer`` reads ``output_router_logits``, ``router_aux_loss_coef``, ``num_experts`` and
``num_experts_per_tok`` from ``get_text_config()``, as for Llama 4 or Qwen3-VL-MoE, whose text configs hold
them), so the keys in :data:`TEXT_CONFIG_MOE_KEYS` live on the text config: this config reads and writes them
there, and ``config.json`` keeps them at the top level only, as files written before did.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

ROUTER_TYPES = ("softmax", "sigmoid")

#: MoE settings held on ``text_config`` (one value, read and written through either config)
TEXT_CONFIG_MOE_KEYS = ("num_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef",
                        "router_z_loss_coef")


class UpcycleMoeConfig(PreTrainedConfig):
    r"""The dense family's config plus the MoE settings.

    Args:
        text_config: the dense model's config (a dict with ``model_type`` or a config object).
        layers_module: dotted path of the decoder-layer list inside the dense ``*ForCausalLM``
            (``model.layers``, ``transformer.h``, ``gpt_neox.layers``).
        mlp_module: attribute of a decoder layer that holds its MLP (``mlp``).
        moe_layers: indices of the layers whose MLP is an MoE block (None: every layer).
        num_experts / num_experts_per_tok: routed experts per MoE layer and top-k.
        moe_intermediate_size: width of each routed expert.
        shared_expert_intermediate_size: width of the always-on shared expert (0: none).
        shared_expert_gated: multiply the shared expert by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).
        hidden_act: activation of the experts (None: the dense config's).
        mlp_gated: ``down(act(gate(x)) * up(x))`` when true, ``down(act(up(x)))`` when false.
        mlp_bias: the expert projections carry biases.
        mlp_dropout: dropout on the block output while training (GPT-2 / StarCoder2 residual dropout).
        router_type: ``softmax`` (softmax over all experts, then top-k) or ``sigmoid`` (per-expert sigmoid).
        norm_topk_prob: renormalise the top-k weights to sum to 1 (needed for exact upcycling).
        routed_scaling_factor: multiplier on the routing weights after renormalisation.
        output_router_logits: return router logits and add the auxiliary losses to the loss.
        router_aux_loss_coef: weight of the load-balancing loss (Switch Transformer).
        router_z_loss_coef: weight of the router z-loss (ST-MoE).
    """

    model_type = "upcycle_moe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    keys_to_ignore_at_inference = ["past_key_values"]

    text_config: dict | PreTrainedConfig | None = None
    layers_module: str = "model.layers"
    mlp_module: str = "mlp"
    moe_layers: list[int] | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = False
    hidden_act: str | None = None
    mlp_gated: bool = True
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    router_type: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.001
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text = self.text_config
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size)
        if self.moe_layers is None:
            self.moe_layers = list(range(text.num_hidden_layers))
        own = super().__getattribute__("__dict__")
        for key in TEXT_CONFIG_MOE_KEYS:  # this file's top-level values win over any left in text_config
            setattr(text, key, own[key])
        self.validate_moe()

    def _moe_text_config(self, key: str) -> PreTrainedConfig | None:
        """The text config once it holds ``key`` (None while the config is being built)."""
        if key not in TEXT_CONFIG_MOE_KEYS:
            return None
        text = super().__getattribute__("__dict__").get("text_config")
        return text if isinstance(text, PreTrainedConfig) and key in vars(text) else None

    def __getattribute__(self, key):
        if key in TEXT_CONFIG_MOE_KEYS and (text := self._moe_text_config(key)) is not None:
            return getattr(text, key)
        return super().__getattribute__(key)

    def __setattr__(self, key, value):
        if key in TEXT_CONFIG_MOE_KEYS and (text := self._moe_text_config(key)) is not None:
            setattr(text, key, value)
        super().__setattr__(key, value)

    def to_dict(self) -> dict:
        """As transformers writes it, with the MoE keys at the top level only (the layout of older files)."""
        output = super().to_dict()
        if isinstance(output.get("text_config"), dict):
            for key in TEXT_CONFIG_MOE_KEYS:
                output["text_config"].pop(key, None)
                output[key] = getattr(self, key)
        return output

    def validate_moe(self) -> None:
        """Reject settings the model cannot run, with the fix."""
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.text_config.num_hidden_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} are outside the {self.text_config.num_hidden_layers} layers")

    @property
    def expert_activation(self) -> str:
        """The experts' activation name: ``hidden_act`` or the dense config's own key for it."""
        if self.hidden_act:
            return self.hidden_act
        text = self.text_config
        for key in ("hidden_activation", "hidden_act", "activation_function"):
            if getattr(text, key, None):
                return getattr(text, key)
        return "silu"


__all__ = ["UpcycleMoeConfig", "TEXT_CONFIG_MOE_KEYS"]
