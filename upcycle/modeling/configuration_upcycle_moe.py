"""Configuration of the bundled upcycled MoE model (``model_type: upcycle_moe``).

Self-contained: imports only transformers, so the file is copied into checkpoints and loads with
``trust_remote_code=True`` where upcycle is not installed.

The dense model's own config is kept whole under ``text_config`` (with its ``model_type``); the fields
below say which layers are MoE and what their experts look like.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

ROUTER_TYPES = ("softmax", "sigmoid")


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
        self.validate_moe()

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


__all__ = ["UpcycleMoeConfig"]
