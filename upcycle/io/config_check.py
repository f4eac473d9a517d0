"""A dense source's config.json, checked before anything is sized from it.

transformers reads whatever ``config.json`` holds: a list, a missing ``model_type``, ``hidden_size: "64"``
or ``num_hidden_layers: 1000000000`` (whose per-layer lists alone fill the memory) fail deep inside it or
much later. Here the raw JSON is checked first, the layer count is bounded by the layers the weights
actually hold, and (once the family is known) the tensors the model class needs are checked against the
checkpoint: present, with the shapes the config implies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from ..errors import CorruptCheckpointError, UnsupportedArchitectureError

#: integer sizes a dense config may hold; when present (and not null) each must be an integer >= 1
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings",
             "n_embd", "n_inner", "n_layer", "n_head", "n_positions")
LAYER_KEYS = ("num_hidden_layers", "n_layer")
#: ``<...>.layers.N.`` (most families), ``transformer.h.N.`` (GPT-2), ``encoder.layer.N.``, ``blocks.N.``
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_config_json(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict, refused with the field named when it is not JSON, not an object, has no
    string ``model_type`` or has a size that is not a positive integer."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CorruptCheckpointError(f"{path}: {path.stat().st_size} bytes is too large for a config")
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"{path}: not valid JSON") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    check_config_dict(config, str(path))
    return config


def check_config_dict(config: Any, where: str) -> None:
    """The checks of :func:`read_config_json` on an already parsed config."""
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{where}: a config must be a JSON object, not a {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CorruptCheckpointError(f"{where}: 'model_type' is missing or not a string "
                                     f"(got {model_type!r}); is this a transformers model's config.json?")
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise CorruptCheckpointError(f"{where}: '{key}' must be an integer >= 1, got {value!r}")


def check_layer_count(config: dict[str, Any], tensor_names: Iterable[str], where: str) -> None:
    """The config's layer count may not exceed the decoder layers whose tensors the checkpoint holds
    (or, when no tensor name shows a layer index, the number of tensors)."""
    wanted = next((config[k] for k in LAYER_KEYS if config.get(k) is not None), None)
    if wanted is None:
        return
    names = list(tensor_names)
    present = {int(m.group(1)) for name in names for m in [_LAYER_INDEX.search(name)] if m}
    key = next(k for k in LAYER_KEYS if config.get(k) is not None)
    if not present:
        if wanted > len(names):
            raise CorruptCheckpointError(f"{where}: '{key}' is {wanted} but the weights hold only "
                                         f"{len(names)} tensors")
        return
    if wanted > len(present) or any(i not in present for i in range(wanted)):
        missing = next(i for i in range(wanted) if i not in present)
        raise CorruptCheckpointError(f"{where}: '{key}' is {wanted} but the weights hold {len(present)} "
                                     f"decoder layer(s) (none for layer {missing})")


def load_checked_config(folder: Path, tensor_names: Iterable[str]) -> Any:
    """The transformers config of a dense model folder, read only after the checks above pass."""
    from transformers import AutoConfig

    from ..checkpoint import CONFIG_FILE, inside_folder

    path = inside_folder(Path(folder), CONFIG_FILE, str(folder))  # not a link to another model's config
    config = read_config_json(path)
    check_layer_count(config, tensor_names, str(path))
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - e.g. huggingface_hub's StrictDataclassError for a field's type
        reason = _first_sentence(exc)
        raise UnsupportedArchitectureError(f"{path}: transformers cannot read this config "
                                           f"(model_type {config['model_type']!r}): {reason}") from None


def check_required_tensors(config: Any, stored: dict[str, Any], where: str = "the checkpoint") -> None:
    """Every parameter the transformers model class of ``config`` has is stored, with the shape it has
    there; a missing embedding or final norm would otherwise be filled with random values on load.

    ``stored`` maps tensor names to objects with a ``shape``. Tensors the class does not have are ignored.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build a model from
        reason = _first_sentence(exc)
        raise CorruptCheckpointError(f"{where}: config.json does not describe a model transformers can "
                                     f"build: {reason}") from None
    loaded, renames_only = _as_loaded(skeleton, stored)
    missing = []
    for name, param in skeleton.named_parameters():
        info = loaded.get(name)
        if info is None:
            missing.append(name)
        elif tuple(info.shape) != tuple(param.shape):
            raise CorruptCheckpointError(f"{where}: tensor {name!r} has shape {list(info.shape)}, but config.json "
                                         f"implies {list(param.shape)}")
    if missing and renames_only:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CorruptCheckpointError(f"{where} has no tensor {missing[0]!r}{more}, which the model needs; "
                                     "the checkpoint is incomplete or is not this config's model")


def _as_loaded(skeleton: Any, stored: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``stored`` under the names transformers loads them as (its checkpoint renames, e.g. GPT-NeoX's
    ``embed_out`` -> ``lm_head``), and whether every transform is a plain renaming (else a parameter may be
    made from several stored tensors, and a missing name proves nothing)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(skeleton)
    except Exception:  # noqa: BLE001 - another transformers version: compare the names as stored
        return stored, True
    renames = [t for t in transforms if type(t) is WeightRenaming]
    loaded = {}
    for name, info in stored.items():
        for transform in renames:
            name = transform.rename_source_key(name)[0]
        loaded[name] = info
    return loaded, len(renames) == len(transforms)


def _first_sentence(exc: Exception) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0].rstrip(".")
