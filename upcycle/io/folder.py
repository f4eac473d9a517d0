"""Local checkpoint folders: single or sharded safetensors, or legacy ``pytorch_model*.bin``."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, TORCH_INDEX_FILE, TORCH_SINGLE_FILE, WeightFiles, weight_files
from ..errors import CorruptCheckpointError, SourceNotFoundError
from .safetensors_format import TensorInfo, read_header, read_tensor
from .source import DenseSource


def _weight_paths(folder: Path, single: str, index: str) -> list[Path]:
    """The weight files of ``folder`` in one layout (single file or indexed shards); missing shards refused."""
    weights = weight_files(folder, single=single, index=index)
    if weights is None:
        return [folder / single]
    missing = weights.missing(folder)
    if missing:
        raise SourceNotFoundError(f"{folder / index} names shard(s) that are missing: {', '.join(missing)}")
    return [folder / f for f in weights.files]


def merge_shards(index_path: Optional[Path], weight_map: dict[str, str],
                 shards: dict[str, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """Every tensor once: a tensor stored in two shards, or in a shard other than the one the index names,
    or named by the index but absent from its shard, is a corrupt checkpoint (transformers and the
    safetensors library would each pick a different copy)."""
    infos: dict[str, TensorInfo] = {}
    for file, found in shards.items():
        for name, info in found.items():
            if name in infos:
                raise CorruptCheckpointError(f"tensor {name!r} is stored twice, in {infos[name].file.name} and "
                                             f"{info.file.name}; the checkpoint is ambiguous")
            if index_path is not None and weight_map.get(name) != file:
                raise CorruptCheckpointError(f"{index_path}: tensor {name!r} is in {file} but the index "
                                             f"says {weight_map.get(name)!r}")
            infos[name] = info
    missing = [name for name in weight_map if name not in infos]
    if missing:
        raise CorruptCheckpointError(f"{index_path}: tensor {missing[0]!r} is not in its shard "
                                     f"{weight_map[missing[0]]}" + (f" ({len(missing)} tensors missing)"
                                                                    if len(missing) > 1 else ""))
    return infos


class SafetensorsFolder(DenseSource):
    """A folder with ``model.safetensors`` or ``model.safetensors.index.json`` and its shards."""

    def __init__(self, folder: Path, spec: str | None = None):
        self.folder = Path(folder)
        self.spec = spec or str(folder)
        files = _weight_paths(self.folder, SINGLE_FILE, INDEX_FILE)
        weights = weight_files(self.folder) or WeightFiles([SINGLE_FILE])
        index_path = self.folder / weights.index if weights.index else None
        headers = {name: read_header(path)[0] for name, path in zip(weights.files, files)}
        self._infos = merge_shards(index_path, weights.weight_map or {}, headers)

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self._infos[name])

    def stored(self, name: str) -> Optional[TensorInfo]:
        return self._infos.get(name)  # None for canonical names a family view cuts out of a fused tensor

    def load_config(self) -> Any:
        from .config_check import load_checked_config

        return load_checked_config(self.folder, self.infos)


class TorchBinFolder(DenseSource):
    """Legacy ``pytorch_model.bin`` (or sharded with an index), loaded with ``weights_only=True``.

    Each shard is memory-mapped when its zip layout allows, so only the tensor being read is resident.
    """

    def __init__(self, folder: Path, spec: str | None = None):
        self.folder = Path(folder)
        self.spec = spec or str(folder)
        self._files = _weight_paths(self.folder, TORCH_SINGLE_FILE, TORCH_INDEX_FILE)
        self._where: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._loaded: tuple[Path, dict[str, torch.Tensor]] | None = None
        for path in self._files:
            for name, tensor in self._load(path).items():
                if name in self._where:
                    raise CorruptCheckpointError(f"tensor {name!r} is stored twice, in {self._where[name].name} "
                                                 f"and {path.name}; the checkpoint is ambiguous")
                self._where[name] = path
                self._infos[name] = TensorInfo(path, tensor.dtype, tuple(tensor.shape))

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        if self._loaded is not None and self._loaded[0] == path:
            return self._loaded[1]
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CorruptCheckpointError(f"{path}: refused: it holds objects other than tensors "
                                         f"({_unpickling_reason(exc)}); upcycle reads .bin files with "
                                         "weights_only=True and never runs code stored in them. Convert it "
                                         "to safetensors with a tool you trust, or use a safetensors source") from None
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorruptCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({reason})") from None
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{path}: does not hold a state dict")
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._loaded = (path, state)
        return state

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        return self._load(self._where[name])[name].clone()

    def load_config(self) -> Any:
        from .config_check import load_checked_config

        return load_checked_config(self.folder, self.infos)


def _unpickling_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused, without its advice to turn the safety off."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "documentation" not in line
              and not line.startswith("Weights only load failed")]
    return (useful[0] if useful else "unsupported content").rstrip(".")


def open_folder(folder: Path, spec: str | None = None) -> DenseSource:
    """Pick the reader for a local folder, preferring safetensors; a clear error when it holds no model."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise SourceNotFoundError(f"{folder} is not a model folder: it has no config.json")
    if (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file():
        return SafetensorsFolder(folder, spec)
    if (folder / TORCH_SINGLE_FILE).is_file() or (folder / TORCH_INDEX_FILE).is_file():
        return TorchBinFolder(folder, spec)
    raise SourceNotFoundError(
        f"{folder} has a config.json but no weights (model.safetensors, an index with shards, or pytorch_model.bin)")
