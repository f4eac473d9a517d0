"""The checkpoint folder format: file names, the recipe file, the weight-file listing, MoE config keys.

One definition, used by convert, inspect, verify, push, train and the source readers. Torch-free (it
imports neither torch nor transformers), so that pushing and inspecting never load them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from .errors import CorruptCheckpointError, SourceNotFoundError, UpcycleError
from .version import __version__

CONFIG_FILE = "config.json"
RECIPE_FILE = "upcycle_recipe.json"
CARD_FILE = "README.md"
GENERATION_CONFIG_FILE = "generation_config.json"
# the transformers names of the weights (single file, or shards listed by an index)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_SINGLE_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"

# Config keys that hold an MoE's expert count and experts per token, first match wins
# (mixtral/qwen and others; ernie4_5_moe ``moe_k``; hunyuan_v1_moe ``moe_topk``; ``moe_top_k``/``top_k``).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "moe_top_k", "top_k")
EXPERT_SIZE_KEYS = ("moe_intermediate_size", "intermediate_size")
# the libraries whose versions a checkpoint records, in the order the recipe lists them
VERSIONED_LIBRARIES = ("torch", "transformers", "safetensors", "huggingface_hub")


def model_folder(path: str | Path) -> Path:
    """``path`` as a Path when it is a model folder (has ``config.json``); SourceNotFoundError otherwise."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise SourceNotFoundError(f"{path}: not a model folder (no {CONFIG_FILE})")
    return folder


# --- the recipe file -------------------------------------------------------------------------------

def recipe_text(recipe: Mapping[str, Any], provenance: Optional[Mapping[str, Any]] = None) -> str:
    """The text of ``upcycle_recipe.json``: the flat recipe keys, then ``upcycle`` (provenance) when given."""
    data = dict(recipe) if provenance is None else {**recipe, "upcycle": provenance}
    return json.dumps(data, indent=2, allow_nan=False) + "\n"  # strict JSON: a NaN is a bug, never a literal


def write_recipe(folder: str | Path, recipe: Mapping[str, Any],
                 provenance: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``folder/upcycle_recipe.json`` (see :func:`recipe_text`); return its file name."""
    (Path(folder) / RECIPE_FILE).write_text(recipe_text(recipe, provenance))
    return RECIPE_FILE


def read_recipe(folder: str | Path) -> Optional[dict[str, Any]]:
    """The recipe file of a checkpoint folder as a dict (provenance under ``upcycle``); None without one."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"{path}: not valid JSON; re-run the conversion") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: not a recipe (a JSON object); re-run the conversion")
    return data


def provenance_of(recipe: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``upcycle`` section of a recipe file's contents (empty when absent)."""
    provenance = (recipe or {}).get("upcycle")
    return dict(provenance) if isinstance(provenance, Mapping) else {}


def library_versions() -> dict[str, str]:
    """Versions of upcycle and the libraries a conversion or training run depends on (for provenance)."""
    import importlib.metadata

    return {"upcycle": __version__, **{name: importlib.metadata.version(name) for name in VERSIONED_LIBRARIES}}


# --- weight files ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint folder, as its index (or single file) names them."""

    files: list[str]  # shard file names, in the order the index first names them
    index: Optional[str] = None  # the index file's name; None for a single file
    weight_map: Optional[dict[str, str]] = None  # tensor name -> shard file (from the index)
    total_size: Optional[int] = None  # the index's metadata.total_size, when it records one

    def missing(self, folder: str | Path) -> list[str]:
        """The named files that are not in ``folder``."""
        return [f for f in self.files if not (Path(folder) / f).is_file()]


def inside_folder(folder: Path, name: str, what: str, error: type[UpcycleError] = CorruptCheckpointError) -> Path:
    """``folder / name`` when ``name`` is a plain relative path that stays inside ``folder`` once symlinks
    are resolved; a Hugging Face cache snapshot may also link into its own repo's ``blobs`` folder.

    A hostile index (or a link) naming ``/home/alice/private.safetensors`` or ``../x`` is refused, so a
    conversion never pulls a file from elsewhere on the machine into an output that may be published.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise error(f"{what}: {name!r} is not a file name")
    relative = PurePosixPath(name)
    if relative.is_absolute():
        if folder.resolve() not in Path(name).resolve().parents:
            raise error(f"{what}: {name!r} points outside the model folder; only files inside it are read")
        raise error(f"{what}: {name!r} is an absolute path; only paths relative to the model folder are read "
                    f"(write {Path(name).resolve().relative_to(folder.resolve()).as_posix()!r})")
    if ".." in relative.parts:
        raise error(f"{what}: {name!r} goes up with '..' and may point outside the model folder; "
                    "only plain paths inside it are read")
    path = folder / relative
    real, roots = path.resolve(), [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<commit>
        roots.append(folder.resolve().parent.parent / "blobs")
    if not any(real == root or root in real.parents for root in roots):
        raise error(f"{what}: {name!r} is a link to {real}, outside the model folder; "
                    "only files inside it are read (copy the file in instead)")
    return path


def read_index(path: str | Path, error: type[UpcycleError] = CorruptCheckpointError) -> WeightFiles:
    """The shards an index file (``*.index.json`` with a ``weight_map``) names; ``error`` when it is malformed.

    The ``weight_map`` must map tensor names to shard file names inside the index's folder (see
    :func:`inside_folder`): a hostile index cannot pull in a file from elsewhere on the machine.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise error(f"{path}: not a valid index (not JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise error(f"{path}: not a valid index (needs an object with a 'weight_map' of tensor names to shard files)")
    weight_map = data["weight_map"]
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise error(f"{path}: weight_map[{name!r}] is {file!r}, not a shard file name")
        inside_folder(path.parent, file, str(path), error)
    metadata = data.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    total = total if isinstance(total, int) and not isinstance(total, bool) else None
    return WeightFiles(list(dict.fromkeys(weight_map.values())), path.name, dict(weight_map), total)


def weight_files(folder: str | Path, *, single: str = SINGLE_FILE, index: str = INDEX_FILE,
                 error: type[UpcycleError] = CorruptCheckpointError) -> Optional[WeightFiles]:
    """The weights of ``folder``: the shards its index names, else its single file; None when it has neither.

    ``single``/``index`` name the layout (safetensors by default, or ``TORCH_SINGLE_FILE``/``TORCH_INDEX_FILE``);
    a malformed index raises ``error``, and so does a weight file that links outside ``folder``.
    """
    folder = Path(folder)
    if (folder / index).is_file():
        return read_index(folder / index, error)
    if (folder / single).is_file():
        inside_folder(folder, single, str(folder), error)
        return WeightFiles([single])
    return None


# --- MoE settings of a config ----------------------------------------------------------------------

def config_value(config: Any, keys: tuple[str, ...]) -> Any:
    """The first set (truthy) value among ``keys`` of a config: a ``config.json`` dict or a config object."""
    if isinstance(config, Mapping):
        return next((config[k] for k in keys if config.get(k)), None)
    return next((getattr(config, k) for k in keys if getattr(config, k, None)), None)


def expert_count(config: Any) -> Any:
    """An MoE config's number of routed experts (None for a dense config)."""
    return config_value(config, EXPERT_COUNT_KEYS)


def experts_per_token(config: Any) -> Any:
    """An MoE config's top-k; a per-layer list with one value reads as that value."""
    value = config_value(config, TOP_K_KEYS)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value) and len(set(value)) == 1:
        value = value[0]
    return value
