"""Record a training run in the output's ``upcycle_recipe.json`` and model card (README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
import shutil

from ..checkpoint import CARD_FILE, RECIPE_FILE, read_recipe, write_recipe


def record_training(source: Path, output: Path, run: dict[str, Any]) -> None:
    """Copy the source's recipe and card into ``output`` with ``run`` appended.

    The recipe gets ``upcycle.training``: a list with one entry per training run, oldest first, and
    ``upcycle.exact`` becomes false (the conversion's claim is kept as ``exact_at_conversion``).
    """
    source, output = Path(source), Path(output)
    recipe = read_recipe(source)
    if recipe is not None:
        provenance = recipe.setdefault("upcycle", {})
        provenance["training"] = list(provenance.get("training", [])) + [run]
        # trained weights no longer compute the dense model's function: verify must not expect equality
        provenance.setdefault("exact_at_conversion", provenance.get("exact"))
        provenance["exact"] = False
        write_recipe(output, recipe)
        number = len(provenance["training"])
    else:
        number = 1
    card_path = source / CARD_FILE
    card = card_path.read_text() if card_path.is_file() else _minimal_card(source)
    (output / CARD_FILE).write_text(card.rstrip() + "\n\n" + training_paragraph(run, number) + "\n")


def copy_code_files(source: Path, output: Path) -> list[str]:
    """Copy the source's remote-code modules (``*.py``, e.g. the bundled model's) that ``output`` lacks,
    so the trained checkpoint still loads with ``trust_remote_code`` where upcycle is not installed."""
    copied = []
    for file in sorted(Path(source).glob("*.py")):
        if not (Path(output) / file.name).exists():
            shutil.copy2(file, Path(output) / file.name)
            copied.append(file.name)
    return copied


def _minimal_card(source: Path) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=["moe", "upcycle"])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# Fine-tuned from {source.name}\n"))


def training_paragraph(run: dict[str, Any], number: int) -> str:
    """The model-card section describing one training run."""
    load = run.get("expert_load") or {}
    balance = ""
    if load:
        balance = (f" Expert load over the last logging window: coefficient of variation {load['cv_mean']:.3f} "
                   f"(0 is perfectly balanced), expert shares between {load['min_share']:.3f} and "
                   f"{load['max_share']:.3f} of the top-k assignments (uniform: {1 / load['num_experts']:.3f}).")
    lora = f", LoRA r={run['lora']['r']} (merged)" if run.get("lora") else ""
    loss = f"{run['final_loss']:.4f}" if run.get("final_loss") is not None else "n/a"
    return (f"## Fine-tuning run {number}\n\n"
            f"Fine-tuned with `upcycle train` on `{run['data']}`: {run['tokens']} tokens in {run['sequences']} "
            f"sequences of {run['seq_len']}, {run['steps']} optimizer steps, learning rate {run['learning_rate']}, "
            f"effective batch {run['effective_batch_size']} sequences on {run['world_size']} process(es), "
            f"load-balancing loss coefficient {run['aux_loss_coef']}, router z-loss coefficient "
            f"{run['z_loss_coef']}, trained parameters: {run['train']}{lora}. Final training loss "
            f"(language model + router terms) {loss}."
            f"{balance} The run is recorded under `upcycle.training` in `{RECIPE_FILE}`.")
