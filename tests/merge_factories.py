"""Tiny fine-tunes for the merge tests: a random base model (with a real word-level tokenizer) and copies
whose FFN (or attention) weights are perturbed differently."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from factories import make_dense, save_tiny_tokenizer
from safetensors.torch import load_file, save_file

#: prompts over the tiny tokenizer's vocabulary, one topic per expert
PROMPTS = (
    ["the a of to and the a of", "of to and the a"],
    ["in is it that was in is", "it that was in is it"],
    ["for on are as with for on", "are as with his for"],
)


def make_base(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    base = make_dense(family, folder, seed=seed, **overrides)
    save_tiny_tokenizer(base)
    return base


def fine_tune(base: Path, folder: Path, seed: int, part: str = "mlp", scale: float = 0.05) -> Path:
    """A copy of ``base`` with Gaussian noise (std ``scale``) added to every tensor whose name contains ``part``."""
    shutil.copytree(base, folder)
    state = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    for key, value in state.items():
        if part in key and value.is_floating_point():
            state[key] = value + scale * torch.randn(value.shape, generator=gen)
            touched += 1
    assert touched, f"no tensor of {base} contains {part!r}"
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def config(base: Path, sources: list[Path], **options) -> dict:
    """An own-format config with one expert per source and the topic prompts."""
    experts = [{"source": str(s), "prompts": PROMPTS[i % len(PROMPTS)]} for i, s in enumerate(sources)]
    return {"base_model": str(base), "experts": experts, **options}
