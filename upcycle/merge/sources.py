"""One reader over several checkpoints: the base (or averaged) shared weights under their own names and
each source's tensors under ``"<source-id>::<key>"`` (what :attr:`ExpertSlice.source` reads).

Only headers and configs are read when opening; tensors are read one at a time, one source at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UnsupportedArchitectureError, UpcycleError
from ..io import open_source
from ..io.safetensors_format import TensorInfo
from ..io.source import DenseSource
from ..tensors import SOURCE_SEPARATOR as SEPARATOR

STALE = ("rotary_emb.inv_freq",)  # buffers old checkpoints saved (never part of the output)
#: config keys that name, version or tokenise a checkpoint without changing what its layers compute
IGNORED_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache", "id2label", "label2id",
    "task_specific_params", "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class",
    "prefix", "problem_type", "finetuning_task", "chunk_size_feed_forward", "torchscript",
}


def source_id(index: int) -> str:
    """The key prefix of the ``index``-th distinct source."""
    return f"s{index}"


def _config_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def first_config_difference(base: dict[str, Any], other: dict[str, Any]) -> Optional[str]:
    """The first architecture config key whose value differs (sorted order), described; None when all agree."""
    keys = sorted((set(base) | set(other)) - IGNORED_CONFIG_KEYS)
    for key in keys:
        if key.startswith("_"):
            continue
        if base.get(key) != other.get(key):
            return f"config key {key!r} is {other.get(key)!r}, the base's is {base.get(key)!r}"
    return None


def first_tensor_difference(base: dict[str, TensorInfo], other: dict[str, TensorInfo]) -> Optional[str]:
    """The first tensor that is missing, extra or of another shape, described; None when all agree."""
    for name, info in base.items():
        if name.endswith(STALE):
            continue
        if name not in other:
            return f"it has no tensor {name}"
        if tuple(other[name].shape) != tuple(info.shape):
            return f"tensor {name} has shape {list(other[name].shape)}, the base's is {list(info.shape)}"
    extra = [name for name in other if name not in base and not name.endswith(STALE)]
    return f"it has a tensor the base lacks: {extra[0]}" if extra else None


class MergedSource(DenseSource):
    """The base checkpoint plus the expert sources, read through one interface.

    ``average`` lists source ids whose shared (non-FFN) tensors are averaged in place of the base's;
    tensors equal in every averaged source are passed through unchanged.
    """

    def __init__(self, base: DenseSource, sources: dict[str, DenseSource], family: Any,
                 average: Optional[list[DenseSource]] = None):
        self.base, self.sources, self.family = base, sources, family
        self.average = average or []
        self.spec, self.folder = base.spec, base.folder
        self.repo_id, self.commit = base.repo_id, base.commit
        self._fused_ffn: Optional[set[str]] = None

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.base.infos

    def is_ffn(self, name: str) -> bool:
        """True for a base tensor that holds FFN weights (stored fused ones, e.g. Phi-3 ``gate_up_proj``, included)."""
        if self.family.mlp_role(name) is not None:
            return True
        if self._fused_ffn is None:
            views = self.family.present(_config_dict(self.base.load_config()), self.base.infos)[1]
            self._fused_ffn = {v.fused for key, v in views.items() if self.family.mlp_role(key) is not None}
        return name in self._fused_ffn

    def _averaged(self, name: str) -> bool:
        return bool(self.average) and not self.is_ffn(name) and self.base.infos[name].dtype.is_floating_point

    def read(self, name: str) -> torch.Tensor:
        sid, sep, key = name.partition(SEPARATOR)
        if sep:  # fused tensors were already resolved by the SourceCache (same views, same prefix)
            return self.sources[sid].read(key)
        if self._averaged(name):
            return self._mean(name)
        return self.base.read(name)

    def _mean(self, name: str) -> torch.Tensor:
        """The mean over the averaged sources, one tensor read at a time; unchanged when they all agree."""
        first = self.average[0].read(name)
        total, same = first.float(), True
        for source in self.average[1:]:
            tensor = source.read(name)
            same = same and torch.equal(tensor, first)
            total = total + tensor.float()
            del tensor
        return first if same else total / len(self.average)

    def stored(self, name: str) -> Optional[TensorInfo]:
        sid, sep, key = name.partition(SEPARATOR)
        if sep:
            return self.sources[sid].stored(key)
        return None if self._averaged(name) else self.base.stored(name)

    def load_config(self) -> Any:
        return self.base.load_config()

    def pretrained_kwargs(self) -> dict[str, Any]:
        return self.base.pretrained_kwargs()

    def save_tokenizer(self, dest: Path) -> list[str]:
        return self.base.save_tokenizer(dest)

    def generation_config(self, config: Any) -> Any:
        return self.base.generation_config(config)


def open_checked(spec: str, revision: Optional[str], where: str, quiet: bool, headers_only: bool) -> DenseSource:
    """Open one source, naming the config entry in the error when it cannot be opened."""
    try:
        return open_source(spec, revision, quiet=quiet, headers_only=headers_only)
    except UpcycleError as exc:
        raise type(exc)(f"{where}: {exc}") from None


def check_compatible(base: DenseSource, base_config: dict[str, Any], source: DenseSource, where: str) -> None:
    """Refuse a source whose architecture or any tensor shape differs from the base's (first difference named)."""
    other = _config_dict(source.load_config())
    if other.get("model_type") != base_config.get("model_type"):
        raise UnsupportedArchitectureError(
            f"{where} ({source.spec}) is a {other.get('model_type')!r} model and the base a "
            f"{base_config.get('model_type')!r} one; every source must be a fine-tune of the base's architecture")
    why = first_config_difference(base_config, other) or first_tensor_difference(base.infos, source.infos)
    if why:
        raise UnsupportedArchitectureError(f"{where} ({source.spec}) does not match the base {base.spec}: {why}; "
                                           "every source must share the base's architecture and shapes")
