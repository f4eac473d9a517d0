"""The hidden states that enter each layer's FFN, from the dense base model (float32), streamed.

Used by the ``hidden`` and ``domain`` router inits: each call runs token sequences through the base model
one decoder layer at a time (:mod:`upcycle.runner`: memory is one layer plus the sequences' hidden states,
whatever the model size) with a hook on every listed FFN, and returns, per layer, the mean over the
tokens (special tokens left out).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..runner import StreamedModel, resolve_device


def ffn_module_name(family: Any, layer: int) -> str:
    """Dotted path of layer ``layer``'s FFN module (``model.layers.3.mlp``)."""
    return family.mlp_key(layer, "down").rsplit(".", 2)[0]


class FfnInputs:
    """The dense base model, streamed layer by layer, with a forward-pre hook on each listed layer's FFN."""

    def __init__(self, src: Any, family: Any, layers: list[int], device: str = "cpu"):
        self.model = StreamedModel(src, device=resolve_device(device), dtype=torch.float32)
        modules = dict(self.model.model.named_modules())
        self.layers = sorted(layers)
        self._captured: dict[int, list[torch.Tensor]] = {}
        self._handles = [modules[ffn_module_name(family, layer)].register_forward_pre_hook(self._hook(layer))
                         for layer in self.layers]

    def _hook(self, layer: int):
        def hook(module, args):
            self._captured.setdefault(layer, []).append(args[0].detach())

        return hook

    def _run(self, sequences: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
        """``layer -> [[tokens, hidden] per sequence]``: one streamed pass up to the last listed layer."""
        batches = [ids.view(1, -1) for ids in sequences]
        with torch.no_grad():
            hidden = self.model.embed(batches)
            self._captured.clear()
            for index in range(self.layers[-1] + 1):
                with self.model.layer(index) as module:
                    hidden = [self.model.run_layer(module, index, [h], batch=b)[0] for b, h in enumerate(hidden)]
        return {layer: [x.reshape(-1, x.shape[-1]).float() for x in self._captured[layer]] for layer in self.layers}

    def states(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """``layer -> [tokens, hidden]`` FFN inputs of one sequence ``ids`` [n]."""
        return {layer: found[0] for layer, found in self._run([ids]).items()}

    def mean(self, sequences: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """``layer -> [hidden]``: the mean FFN input over the kept tokens of ``(ids, keep_mask)`` sequences."""
        pairs = list(sequences)
        count = sum(int(keep.sum()) for _, keep in pairs)
        if not count:
            raise ValueError("no tokens to average")
        found = self._run([ids for ids, _ in pairs])
        return {layer: sum(states[keep].sum(0) for states, (_, keep) in zip(found[layer], pairs)) / count
                for layer in self.layers}

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
