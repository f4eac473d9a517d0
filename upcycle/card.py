"""The model card (README.md) written with every conversion, through huggingface_hub's card utilities."""

from __future__ import annotations

from typing import Any, Optional


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render_card(summary: dict[str, Any], recipe: dict[str, Any], base_model: Optional[str],
                license: Optional[str] = None, verification: Optional[dict[str, Any]] = None):
    """Build a :class:`huggingface_hub.ModelCard` with Hub metadata and the recipe table."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["moe", "upcycled", "upcycle", summary["target"]],
    )
    if base_model:
        data.base_model_relation = "finetune"
    exactness = ("exact: the MoE computes the dense model's function (logits equal up to float rounding)"
                 if summary["exact"] else "not exact by design: the experts deviate from the dense FFN")
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in recipe.items() if k != "extra" or v)
    if verification:
        verified = (f"max |Δlogit| = {verification['max_abs_logit_diff']:.3g}, mean KL = "
                    f"{verification['mean_kl']:.3g}, greedy agreement = {verification['greedy_match']:.0%}")
    else:
        verified = "not run at conversion time; run `upcycle verify BASE THIS_FOLDER`"
    name = base_model or "a dense model"
    body = f"""
# {summary['architecture']} upcycled from {name}

This Mixture-of-Experts model was made with [upcycle](https://pypi.org/project/upcycle/) from
{name} by `{summary['method']}`: {summary['num_experts']} experts, top-{summary['top_k']} routing,
MoE in layers {_layers(summary['moe_layers'], summary['num_layers'])}.

- Exactness: {exactness}.
- Verification: {verified}.
- Parameters: {_params(summary['total_params'])} total, {_params(summary['active_params'])} active per token.

## Recipe

| key | value |
|---|---|
{rows}

`upcycle_recipe.json` in this repository reproduces the conversion: `upcycle convert SOURCE OUT --recipe upcycle_recipe.json`.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("THIS_REPO")  # {summary['architecture']}
tokenizer = AutoTokenizer.from_pretrained("THIS_REPO")
```

## Fine-tuning

Replicated experts start identical, so the router gets no signal from the language-model loss at
first: fine-tune with a load-balancing loss (`output_router_logits=True`, `router_aux_loss_coef`)
so that the experts specialise.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _layers(moe_layers: list[int], num_layers: int) -> str:
    if list(moe_layers) == list(range(num_layers)):
        return f"all {num_layers}"
    return ", ".join(str(i) for i in moe_layers)
