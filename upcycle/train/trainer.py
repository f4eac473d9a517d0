"""``UpcycleTrainer``: transformers' Trainer with router losses and expert-load monitoring."""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import Trainer

from ..errors import UnsupportedArchitectureError
from .losses import load_balancing_loss, router_z_loss
from .monitor import ExpertLoadCallback


def router_logits_of(outputs: Any) -> tuple:
    """The per-layer router logits of a forward run with ``output_router_logits=True``."""
    logits = outputs.get("router_logits") if isinstance(outputs, dict) else getattr(outputs, "router_logits", None)
    if not logits:
        raise UnsupportedArchitectureError(
            "the model returned no router logits with output_router_logits=True; upcycle train needs an MoE "
            "that reports them (native transformers MoE classes and the bundled upcycle model do)")
    return tuple(logits)


class UpcycleTrainer(Trainer):
    """A :class:`~transformers.Trainer` that adds ``aux_loss_coef * load_balancing + z_loss_coef * z_loss``
    to the language-model loss and feeds an :class:`ExpertLoadCallback`.

    The model's own router losses must be off (:func:`set_model_router_losses` with zeros): this class adds
    them itself, so that they are scaled the same way under gradient accumulation for every model.
    ``router_type`` is ``softmax`` or ``sigmoid`` (the balancing loss then uses normalised sigmoid scores).
    """

    def __init__(self, *args: Any, top_k: int, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 load_monitor: Optional[ExpertLoadCallback] = None, router_type: str = "softmax", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.top_k = top_k
        self.router_type = router_type
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.load_monitor = load_monitor or ExpertLoadCallback(top_k)
        # first in line, so the printers and reporters after it see the load statistics
        self.callback_handler.callbacks.insert(0, self.load_monitor)

    def _scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of Trainer.training_step: will the Trainer still divide this loss by the GA steps?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "output_router_logits": True, "use_cache": False}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        router_logits = router_logits_of(outputs)
        mask = inputs.get("attention_mask")  # padding, when the data has any, is left out of both
        aux = load_balancing_loss(router_logits, self.top_k, self.router_type, mask)
        z = router_z_loss(router_logits, mask)
        extra = self.aux_loss_coef * aux + self.z_loss_coef * z
        if model.training:
            if self._scaled_for_ga(num_items_in_batch):
                # the LM loss is already normalised over the accumulated batch; the router terms are per
                # micro-batch means, so average them over the micro-batches here
                extra = extra / self.current_gradient_accumulation_steps
            self.load_monitor.observe(router_logits, aux, z)
        loss = loss + extra.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


ROUTER_LOSS_KEYS = ("router_aux_loss_coef", "router_z_loss_coef")


def set_model_router_losses(model: Any, aux: float, z: float) -> None:
    """Set the router-loss coefficients a model adds inside ``forward`` (config and cached attributes).

    Training sets both to 0 (UpcycleTrainer adds its own terms); the saved config gets the values used.
    A model without a z-loss setting keeps having none.
    """
    for key, value in zip(ROUTER_LOSS_KEYS, (aux, z)):
        if key == "router_aux_loss_coef" or hasattr(model.config, key):
            setattr(model.config, key, value)
        if hasattr(model, key):
            setattr(model, key, value)


def to_dtype_for_save(model: Any, dtype: Optional[torch.dtype]) -> None:
    """Cast trained fp32 weights back to the checkpoint's original dtype before saving."""
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)
