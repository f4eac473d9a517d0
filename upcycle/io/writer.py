"""Sharded safetensors output in the transformers layout, streamed tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..checkpoint import INDEX_FILE, SINGLE_FILE
from .safetensors_format import TensorInfo, TensorSpec, encode_header, write_tensor_bytes
from .staged import StagedFile


def split_into_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order, as transformers does: a tensor larger than the limit gets a shard alone."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def output_bytes(shards: list[list[TensorSpec]]) -> int:
    """Bytes the shards take on disk, headers included."""
    meta = {"format": "pt"}
    return sum(len(encode_header(s, meta)) + sum(t.nbytes for t in s) for s in shards)


def write_shards(folder: Path, shards: list[list[TensorSpec]],
                 produce: Callable[[TensorSpec], torch.Tensor | TensorInfo],
                 on_bytes: Callable[[int], None] = lambda n: None) -> list[str]:
    """Write every shard (header first, then data in order), fsync it, and the index when sharded.

    ``produce`` returns each tensor, or the :class:`TensorInfo` of a stored tensor whose bytes are
    copied unchanged.
    """
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    for name, specs in zip(names, shards):
        with StagedFile(folder / name) as f:
            f.write(encode_header(specs, {"format": "pt"}))
            for spec in specs:
                write_tensor_bytes(f, spec, produce(spec))
                weight_map[spec.name] = name
                on_bytes(spec.nbytes)
    if len(shards) > 1:
        total = sum(s.nbytes for specs in shards for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
