"""The hidden states that enter each layer's FFN, from the dense base model (transformers, float32).

Used by the ``hidden`` and ``domain`` router inits: each call runs token sequences through the model with
a hook on every FFN and returns, per layer, the mean over the tokens (special tokens left out).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


def ffn_module_name(family: Any, layer: int) -> str:
    """Dotted path of layer ``layer``'s FFN module (``model.layers.3.mlp``)."""
    return family.mlp_key(layer, "down").rsplit(".", 2)[0]


class FfnInputs:
    """The dense base model with a forward-pre hook on each listed layer's FFN."""

    def __init__(self, src: Any, family: Any, layers: list[int]):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(**src.pretrained_kwargs(), dtype=torch.float32).eval()
        modules = dict(self.model.named_modules())
        self.layers = list(layers)
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = [modules[ffn_module_name(family, layer)].register_forward_pre_hook(self._hook(layer))
                         for layer in self.layers]

    def _hook(self, layer: int):
        def hook(module, args):
            self._captured[layer] = args[0].detach()

        return hook

    def states(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """``layer -> [tokens, hidden]`` FFN inputs of one sequence ``ids`` [n]."""
        self._captured.clear()
        with torch.no_grad():
            self.model(ids.view(1, -1))
        return {layer: self._captured[layer].reshape(-1, self._captured[layer].shape[-1]).float()
                for layer in self.layers}

    def mean(self, sequences: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """``layer -> [hidden]``: the mean FFN input over the kept tokens of ``(ids, keep_mask)`` sequences."""
        sums: dict[int, torch.Tensor] = {}
        count = 0
        for ids, keep in sequences:
            for layer, states in self.states(ids).items():
                part = states[keep].sum(0)
                sums[layer] = sums[layer] + part if layer in sums else part
            count += int(keep.sum())
        if not count:
            raise ValueError("no tokens to average")
        return {layer: total / count for layer, total in sums.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        del self.model

    def __enter__(self) -> "FfnInputs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def encode_prompts(tokenizer: Any, prompts: Iterable[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, keep)`` per prompt: the ids with the tokenizer's special tokens, and a mask of the others."""
    special = set(tokenizer.all_special_ids)
    out = []
    for prompt in prompts:
        ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
        keep = torch.tensor([int(i) not in special for i in ids], dtype=torch.bool)
        if ids.numel() and keep.any():
            out.append((ids, keep))
    return out
