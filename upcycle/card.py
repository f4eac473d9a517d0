"""The model card (README.md) written with every conversion, through huggingface_hub's card utilities.

Metadata choices (see docs/hub.md): ``base_model`` is the dense source's repo id and
``base_model_relation`` is ``finetune`` for one source (the MoE's weights are derived from the
base's and are meant to be trained further; it is not an adapter, a quantization or a merge of
several models) and ``merge`` when experts come from several sources. The license is the base
model's, read from its own card when it has one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .checkpoint import CARD_FILE, CONFIG_FILE, RECIPE_FILE

REPO_PLACEHOLDER = "THIS_REPO"
#: the card's default "how to reproduce" paragraph (a merge passes its own)
REPRODUCE = (f"`{RECIPE_FILE}` in this repository records the recipe, the source commit and the library\n"
             f"versions; `upcycle convert SOURCE OUT --recipe {RECIPE_FILE}` reproduces the conversion.")
LICENSE_KEYS = ("license", "license_name", "license_link")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[0-9a-f]{40}/?$")


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def source_license(folder: Path) -> dict[str, str]:
    """``license`` (and ``license_name``/``license_link`` for "other") from the source's own card, if any."""
    from huggingface_hub import ModelCard

    readme = Path(folder) / CARD_FILE
    if not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # noqa: BLE001 - a malformed third-party card must not stop a conversion
        return {}
    return {k: str(data[k]) for k in LICENSE_KEYS if isinstance(data.get(k), (str, int, float)) and data.get(k)}


def repo_id_from_cache_path(folder: Path) -> Optional[str]:
    """``org/name`` when ``folder`` is a snapshot inside the Hugging Face cache, else None."""
    match = _CACHE_SNAPSHOT.search(Path(folder).resolve().as_posix())
    return f"{match['org']}/{match['name']}" if match else None


def check_base_model(repo_id: str, where: str = "--base-model") -> str:
    """``repo_id`` when it is a valid Hub model id (``namespace/name``), else a one-line :class:`RecipeError`
    naming ``where`` (the option or config key it came from) and why."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .errors import RecipeError

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).splitlines()[0].rstrip(".")
        raise RecipeError(f"{where} {repo_id!r} is not a Hub repo id ({reason}); give the model's id as "
                          "namespace/name, e.g. HuggingFaceTB/SmolLM2-135M") from None
    return repo_id


def repo_id_from_config(folder: Path) -> Optional[str]:
    """The ``_name_or_path`` that transformers 4 wrote into ``folder/config.json``, when it names a Hub repo
    (``namespace/name``, not a local path)."""
    import json

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        name = json.loads((Path(folder) / CONFIG_FILE).read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "~")) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def resolve_base_model(explicit: Optional[str], repo_id: Optional[str], folder: Path) -> Optional[str]:
    """The card's ``base_model``: ``explicit`` (which the caller has checked with :func:`check_base_model`, before
    reading anything), else the source's Hub repo id, else one derived from a Hugging Face cache snapshot path,
    else the config's ``_name_or_path`` when that is a repo id."""
    return explicit or repo_id or repo_id_from_cache_path(folder) or repo_id_from_config(folder)


def resolve_base_models(explicit: Sequence[str], sources: Iterable[tuple[Optional[str], Path]]) -> list[str]:
    """A merge's ``base_model`` list: ``explicit`` (checked by the caller) when given, else the id
    :func:`resolve_base_model` derives for each ``(repo_id, folder)`` source, in order, without repeats; sources
    without one are left out (the card's Experts section still lists them)."""
    if explicit:
        return list(dict.fromkeys(explicit))
    derived = (resolve_base_model(None, repo_id, folder) for repo_id, folder in sources)
    return list(dict.fromkeys(name for name in derived if name))


def base_model_relation(base_model: Union[str, Sequence[str], None]) -> Optional[str]:
    """``finetune`` for one base model, ``merge`` for several, None without one."""
    if not base_model:
        return None
    return "finetune" if isinstance(base_model, str) or len(base_model) == 1 else "merge"


def verification_text(verification: Optional[dict[str, Any]], exact: bool) -> str:
    """The card's one-line verification result, as measured at conversion time."""
    if verification and "text" in verification:  # already worded (e.g. a merge's per-source results)
        return verification["text"]
    if not verification or "skipped" in verification:
        reason = f" ({verification['skipped']})" if verification else ""
        return (f"not run at conversion time{reason}; run `upcycle verify BASE_MODEL {REPO_PLACEHOLDER}` "
                "to measure it")
    v = verification
    measured = (f"max |Δlogit| = {v['max_abs_logit_diff']:.3g} at {v['dtype']} over {v['num_prompts']} prompts, "
                f"mean KL = {v['mean_kl']:.3g}")
    if v.get("dense_rounded_to") not in (None, v["dtype"]):
        measured += f" (dense weights rounded to {v['dense_rounded_to']}, as this checkpoint stores them)"
    if v.get("max_new_tokens"):
        measured += (f", greedy continuations identical for {v['greedy_match']:.0%} of prompts over "
                     f"{v['max_new_tokens']} tokens")
    elif v.get("comparison") == "teacher-forced next tokens":
        measured += f", next-token predictions identical at {v['greedy_token_agreement']:.0%} of positions"
    if v.get("per_layer_max_abs_diff"):
        measured += (f"; compared after each of the {len(v['per_layer_max_abs_diff'])} layers, one layer in "
                     f"memory at a time (largest |Δhidden| {max(v['per_layer_max_abs_diff']):.3g})")
    if exact:
        return f"exact, checked at conversion time: {measured} (tolerance {v['atol']:g})"
    return f"not exact by design; deviation measured at conversion time: {measured}"


def render_card(summary: dict[str, Any], recipe: dict[str, Any], base_model: Union[str, Sequence[str], None],
                verification: Optional[dict[str, Any]] = None, *, license_info: Optional[dict[str, str]] = None,
                remote_code: bool = False, repo_id: Optional[str] = None, reproduce: Optional[str] = None):
    """Build a :class:`huggingface_hub.ModelCard`: Hub metadata, recipe table, parameters, measured
    verification, how to load it and how to fine-tune it."""
    from huggingface_hub import ModelCard, ModelCardData

    licence = dict(license_info or {})
    data = ModelCardData(
        base_model=base_model or None,
        base_model_relation=base_model_relation(base_model),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["moe", "mixture-of-experts", "upcycled", "upcycle", summary["target"]],
        **licence,
    )
    repo = repo_id or REPO_PLACEHOLDER
    names = [base_model] if isinstance(base_model, str) else list(base_model or [])
    name = ", ".join(f"[{b}](https://huggingface.co/{b})" for b in names) or "a dense model"
    exact = bool(summary["exact"])
    exactness = ("exact: the MoE computes the dense model's function (logits equal up to float rounding)"
                 if exact else "not exact by design: the experts deviate from the dense FFN")
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in recipe.items() if k != "extra" or v)
    remote = ", trust_remote_code=True" if remote_code else ""
    load_note = ("The architecture ships with this repository (`auto_map` in `config.json`), so loading needs "
                 "`trust_remote_code=True`; read the code in this repository before running it."
                 if remote_code else
                 f"`{summary['architecture']}` is a native transformers class: no remote code is needed.")
    body = f"""
# {summary['architecture']} upcycled from {names[0] if len(names) == 1 else 'a dense model'}

This Mixture-of-Experts model was made with [upcycle](https://pypi.org/project/upcycle/) from
{name} by `{summary['method']}`: {summary['num_experts']} experts of size {summary['expert_size']}
(dense FFN {summary['dense_ffn_size']}), top-{summary['top_k']} routing, MoE in layers
{_layers(summary['moe_layers'], summary['num_layers'])}.

- Exactness: {exactness}.
- Verification: {verification_text(verification, exact)}.
- Parameters: {_params(summary['total_params'])} total, {_params(summary['active_params'])} active per token.

## Recipe

| key | value |
|---|---|
{rows}

{reproduce or REPRODUCE}

## Use

{load_note}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto"{remote})
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```

## Fine-tuning

{_fine_tuning_text(summary, exact)}

```python
model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto"{remote},
                                             output_router_logits=True, router_aux_loss_coef=0.01)
# train with transformers.Trainer (or TRL's SFTTrainer) as for any causal LM: the returned loss
# includes the load-balancing auxiliary loss when output_router_logits=True
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _fine_tuning_text(summary: dict[str, Any], exact: bool) -> str:
    text = ("Train it like the dense model, with the router's load-balancing loss on "
            "(`output_router_logits=True`, `router_aux_loss_coef`) so that tokens spread over the experts.")
    if exact:
        text += (" Its experts start as exact copies (or exact slices) of the dense FFN, so at first the "
                 "language-model loss gives the router no reason to prefer one expert over another: "
                 "expect a short warm-up before the experts diverge, or convert with a method that "
                 "breaks the symmetry (for example drop-upcycling) if it is available.")
    return text


def _layers(moe_layers: list[int], num_layers: int) -> str:
    if list(moe_layers) == list(range(num_layers)):
        return f"all {num_layers}"
    return ", ".join(str(i) for i in moe_layers)
