"""Checkpoint tensors put into a meta-device model skeleton one module group at a time, and taken out again.

Keys are renamed and experts fused by transformers' own loading code (the conversion mapping the model's
``from_pretrained`` uses), so the layer gets exactly the parameters ``from_pretrained`` would give it.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..errors import CorruptCheckpointError
from ..io.safetensors_format import advise_will_need
from ..io.source import DenseSource


class CheckpointWeights:
    """Which checkpoint keys feed which part of ``model``, and loading them into it."""

    def __init__(self, model: nn.Module, source: DenseSource, *, device: torch.device, dtype: torch.dtype,
                 weights_dtype: Optional[torch.dtype] = None, key_mapping: Optional[dict[str, str]] = None):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model, self.source = model, source
        self._prefetcher: Optional[ThreadPoolExecutor] = None
        self.device, self.dtype, self.weights_dtype = device, dtype, weights_dtype
        self.mapping = get_model_conversion_mapping(model, key_mapping)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        meta = model.state_dict()
        #: checkpoint key -> the model's parameter name it feeds (a fused target for merged experts)
        self.target: dict[str, str] = {}
        for key in source.infos:
            renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if renamed not in meta and key in meta:
                renamed = key
            if renamed in meta:
                self.target[key] = renamed

    def prefetch(self, keys: list[str]) -> None:
        """Start reading ``keys``' bytes from disk in the background (a page-cache hint, no memory held here),
        so the next :meth:`load` of them overlaps its disk reads with the work done meanwhile."""
        infos = [info for info in (self.source.stored(key) for key in keys) if info is not None]
        if infos:
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upcycle-prefetch")
            self._prefetcher.submit(advise_will_need, infos)

    def keys_under(self, prefixes: Iterable[str]) -> list[str]:
        """Checkpoint keys whose parameter lies under one of the module ``prefixes`` (``model.layers.3.``)."""
        prefixes = tuple(prefixes)
        return [k for k, t in self.target.items() if t.startswith(prefixes)]

    def load(self, keys: list[str]) -> None:
        """Read ``keys`` from the checkpoint and put them (converted, on the device, in the dtype) into the model.

        One model parameter at a time (the checkpoint tensors that feed it, e.g. every expert's ``w1`` and
        ``w3`` for a fused ``gate_up_proj``): renaming and fusing run in the storage dtype, then the result is
        cast to the dtype the skeleton gave it. So a float32 run of a bf16 checkpoint never holds more than
        one parameter's pieces and copies beside the layer's finished parameters.
        """
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(self.target[key], []).append(key)
        for group in groups.values():
            self._load_group(group)

    def _load_group(self, keys: list[str]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        state = {key: self._read(key) for key in keys}
        stored = {t.dtype for t in state.values() if t.is_floating_point()}
        storage = stored.pop() if len(stored) == 1 else None
        wanted = self._stage(keys, storage)
        config = LoadStateDictConfig(dtype=storage or self.dtype, device_map={"": str(self.device)},
                                     weight_mapping=self.mapping)
        with _quiet_loading():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        del state
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys)[0]
            raise CorruptCheckpointError(f"{self.source.spec}: {name} has shape {tuple(got)}, the config needs "
                                         f"{tuple(want)}")
        for name, dtype in wanted.items():
            module_path, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_path)
            param = getattr(module, attr)
            if param is not None and param.dtype != dtype:
                setattr(module, attr, nn.Parameter(param.detach().to(dtype), requires_grad=False))

    def _stage(self, keys: list[str], storage: Optional[torch.dtype]) -> dict[str, torch.dtype]:
        """Give the meta parameters fed by ``keys`` the storage dtype for loading; returns their own dtypes."""
        wanted: dict[str, torch.dtype] = {}
        for name in {self.target[key] for key in keys}:
            module_path, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_path)
            param = module._parameters.get(attr)
            if param is None or not param.is_floating_point():
                continue
            wanted[name] = param.dtype
            if storage is not None and param.dtype != storage and param.device.type == "meta":
                module._parameters[attr] = nn.Parameter(torch.empty_like(param, dtype=storage), requires_grad=False)
        return wanted

    def assign(self, name: str, key: str) -> None:
        """Put checkpoint tensor ``key`` into parameter ``name`` as is (tied weights: lm_head from embeddings)."""
        module_path, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_path)
        setattr(module, attr, nn.Parameter(self._read(key).to(self.device, self.dtype), requires_grad=False))

    def _read(self, key: str) -> torch.Tensor:
        tensor = self.source.read(key)
        if self.weights_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.weights_dtype)  # the rounding the MoE's storage applied
        return tensor


def release(module: nn.Module) -> None:
    """Put every parameter and buffer of ``module`` back on the meta device, freeing its memory."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                sub._buffers[name] = torch.empty_like(buf, device="meta")


def move_buffers(module: nn.Module, device: torch.device) -> None:
    """Move the real (non-meta) buffers of ``module`` to ``device`` (rotary frequencies, position ids)."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type != "meta" and buf.device != device:
                sub._buffers[name] = buf.to(device)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the non-meta parameters of ``module``."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type != "meta")


@contextlib.contextmanager
def _quiet_loading() -> Any:
    """transformers' per-load progress bar off while a layer loads."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
