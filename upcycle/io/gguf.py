"""GGUF files, dequantised one tensor at a time through transformers' GGUF support.

transformers maps GGUF tensor names to its own and undoes llama.cpp's q/k permutation; it loads
every tensor at once, so we reuse its name map and tensor processors but dequantise lazily from
the memory-mapped file. Tensors come out as float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import CorruptCheckpointError, UnsupportedArchitectureError
from .safetensors_format import TensorInfo
from .source import DenseSource
from .tokenizer_files import make_tokenizer_config_portable


class GGUFSource(DenseSource):
    """A ``.gguf`` file; needs the ``gguf`` package."""

    def __init__(self, path: Path, spec: str | None = None):
        self.file = Path(path)
        self.folder = self.file.parent
        self.spec = spec or str(path)
        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:  # transformers needs accelerate to load GGUF files (verify loads the dense model that way)
            raise UnsupportedArchitectureError(
                f"reading .gguf files needs {' and '.join(missing)}: pip install 'upcycle[gguf]'")
        with open(self.file, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CorruptCheckpointError(f"{self.file}: not a GGUF file (it does not start with 'GGUF')")
        # Parsed on first use: verify only needs the path, and parsing the metadata takes seconds.
        self._config: Any = None
        self._infos: dict[str, TensorInfo] | None = None

    def load_config(self) -> Any:
        from transformers import AutoConfig

        if self._config is None:
            try:
                self._config = AutoConfig.from_pretrained(self.folder, gguf_file=self.file.name)
            except ValueError as exc:
                raise UnsupportedArchitectureError(f"{self.file}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - any other parse failure means a bad file
                raise CorruptCheckpointError(f"{self.file}: cannot be read as GGUF ({exc})") from None
        return self._config

    def _open_tensors(self) -> None:
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(self.file)
        except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
            raise CorruptCheckpointError(f"{self.file}: cannot be read as GGUF ({exc})") from None
        self._build_name_map()

    def _build_name_map(self) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

        architecture = read_field(self._reader, "general.architecture")[0]
        config = self.load_config()
        self._parsed = {"config": config.to_dict(), "tensors": {}}
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self._parsed["config"])
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        gguf_to_hf = _gguf_to_hf_names(skeleton, self._processor, architecture, shapes)
        self._tensors: dict[str, Any] = {}
        infos: dict[str, TensorInfo] = {}
        for tensor in self._reader.tensors:
            hf_name = gguf_to_hf.get(tensor.name)
            if hf_name is None or hf_name not in shapes:
                continue
            self._tensors[hf_name] = tensor
            infos[hf_name] = TensorInfo(self.file, torch.float32, shapes[hf_name])
        self._infos = infos

    @property
    def infos(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            self._open_tensors()
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        info = self.infos[name]
        tensor = self._tensors[name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = self._processor.process(weights=weights, name=tensor.name, tensor_key_mapping={},
                                         parsed_parameters=self._parsed)
        weights = np.ascontiguousarray(result.weights, dtype=np.float32)
        if not weights.flags.writeable:  # float32 tensors come straight from the memory-mapped file
            weights = weights.copy()
        return torch.from_numpy(weights).reshape(info.shape)

    def pretrained_kwargs(self) -> dict[str, Any]:
        return {"pretrained_model_name_or_path": str(self.folder), "gguf_file": self.file.name}

    def save_tokenizer(self, dest: Path) -> list[str]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.folder, gguf_file=self.file.name)
        written = [Path(p).name for p in tokenizer.save_pretrained(dest)]
        make_tokenizer_config_portable(dest)
        return written

    def generation_config(self, config: Any) -> Any:
        from transformers import GenerationConfig

        return GenerationConfig.from_model_config(config)


def _gguf_to_hf_names(skeleton: Any, processor: Any, architecture: str, hf_names: Iterable[str]) -> dict[str, str]:
    """GGUF tensor name -> transformers name, from one llama.cpp name table.

    transformers' ``get_gguf_hf_weights_map`` builds that table again for every submodule (about
    a minute for SmolLM2 on 2 cores); one table maps every name of the dense families we read. Models
    it cannot fully map go through transformers' function.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is not None:
        table = get_tensor_name_map(arch, skeleton.config.num_hidden_layers)
        mapping = {}
        for hf_name in hf_names:
            hf_name = processor.preprocess_name(hf_name)
            base, dot, suffix = hf_name.rpartition(".")
            gguf_name = table.get_name(base) if suffix in ("weight", "bias") else None
            if gguf_name is None:
                break
            mapping[f"{gguf_name}{dot}{suffix}"] = hf_name
        else:
            return mapping
    return get_gguf_hf_weights_map(skeleton, processor)
