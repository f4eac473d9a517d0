"""The dense-checkpoint reader interface shared by every source kind."""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import GENERATION_CONFIG_FILE, inside_folder
from .safetensors_format import TensorInfo
from .tokenizer_files import make_tokenizer_config_portable

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class DenseSource(ABC):
    """A dense checkpoint read one tensor at a time.

    ``infos`` lists every tensor's shape and dtype before any data is read, which lets the writer
    plan the whole output first.
    """

    #: what the user passed, for messages and the model card
    spec: str
    #: local folder holding config and tokenizer files
    folder: Path
    #: Hub repo id and resolved commit, when read from the Hub
    repo_id: Optional[str] = None
    commit: Optional[str] = None

    @property
    @abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor's name, shape and dtype, in checkpoint order."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor, as stored (GGUF is dequantised to float32)."""

    def stored(self, name: str) -> Optional[TensorInfo]:
        """Where the tensor's bytes lie unchanged in a file (safetensors), so they can be copied without
        decoding; None when it must be read with :meth:`read`."""
        return None

    @abstractmethod
    def load_config(self) -> Any:
        """The transformers config object of the dense model."""

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Arguments for ``from_pretrained`` that load this source with transformers."""
        return {"pretrained_model_name_or_path": str(self.folder)}

    def save_tokenizer(self, dest: Path) -> list[str]:
        """Copy the tokenizer files next to the output; returns what was written."""
        written = []
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():  # a link to a file elsewhere (a private key, ...) is refused
                shutil.copyfile(inside_folder(self.folder, name, str(self.folder)), dest / name)
                written.append(name)
        make_tokenizer_config_portable(dest)
        return written

    def generation_config(self, config: Any) -> Any:
        """The dense model's generation config, or one derived from its model config."""
        from transformers import GenerationConfig

        if (self.folder / GENERATION_CONFIG_FILE).is_file():
            inside_folder(self.folder, GENERATION_CONFIG_FILE, str(self.folder))
            return GenerationConfig.from_pretrained(self.folder)
        return GenerationConfig.from_model_config(config)
