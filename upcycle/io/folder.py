"""Local checkpoint folders: single or sharded safetensors, or legacy ``pytorch_model*.bin``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import INDEX_FILE, SINGLE_FILE, TORCH_INDEX_FILE, TORCH_SINGLE_FILE, weight_files
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


class SafetensorsFolder(DenseSource):
    """A folder with ``model.safetensors`` or ``model.safetensors.index.json`` and its shards."""

    def __init__(self, folder: Path, spec: str | None = None):
        self.folder = Path(folder)
        self.spec = spec or str(folder)
        files = _weight_paths(self.folder, SINGLE_FILE, INDEX_FILE)
        self._infos: dict[str, TensorInfo] = {}
        for path in files:
            self._infos.update(read_header(path)[0])

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self._infos[name])

    def stored(self, name: str) -> Optional[TensorInfo]:
        return self._infos.get(name)  # None for canonical names a family view cuts out of a fused tensor

    def load_config(self) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder)


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
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CorruptCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({exc})") from None
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
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder)


def open_folder(folder: Path, spec: str | None = None) -> DenseSource:
    """Pick the reader for a local folder, preferring safetensors; a clear error when it holds no model."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SourceNotFoundError(f"{folder} is not a model folder: it has no config.json")
    if (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file():
        return SafetensorsFolder(folder, spec)
    if (folder / TORCH_SINGLE_FILE).is_file() or (folder / TORCH_INDEX_FILE).is_file():
        return TorchBinFolder(folder, spec)
    raise SourceNotFoundError(
        f"{folder} has a config.json but no weights (model.safetensors, an index with shards, or pytorch_model.bin)")
