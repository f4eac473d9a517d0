"""The safetensors file format, read and written one tensor at a time.

The ``safetensors`` library reads through a memory map and writes whole state dicts; a conversion
that must stay within a fixed memory budget needs positioned reads and a writer that emits the
header first (every shape is known up front) and then streams each tensor's bytes. The layout is
the library's: an 8-byte little-endian header length, a JSON header, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CorruptCheckpointError

DTYPE_TO_STR = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
STR_TO_DTYPE = {v: k for k, v in DTYPE_TO_STR.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies: its file, dtype, shape and byte range inside the data section."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * dtype_size(self.dtype)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def dtype_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check a safetensors header: ``(infos, metadata, data_offset)``.

    Raises :class:`CorruptCheckpointError` naming the file when it is truncated or malformed.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise CorruptCheckpointError(f"{path}: corrupt or truncated safetensors header "
                                         f"(header claims {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON") from None
    data_offset = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    last_end = 0
    for name, entry in header.items():
        try:
            dtype = STR_TO_DTYPE[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
        info = TensorInfo(path, dtype, shape, data_offset + start, data_offset + end)
        if end - start != info.nbytes or start > end:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has {end - start} bytes, "
                                         f"its shape and dtype need {info.nbytes}")
        infos[name] = info
        last_end = max(last_end, end)
    if data_offset + last_end > size:
        raise CorruptCheckpointError(f"{path}: truncated safetensors file: data ends at byte "
                                     f"{data_offset + last_end}, file has {size}")
    return infos, metadata, data_offset


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a positioned read (no memory map, so resident memory stays bounded)."""
    buffer = bytearray(info.end - info.start)
    with open(info.file, "rb", buffering=0) as f:
        view = memoryview(buffer)
        got = 0
        while got < len(buffer):
            n = os.preadv(f.fileno(), [view[got:]], info.start + got)
            if n == 0:
                raise CorruptCheckpointError(f"{info.file}: truncated while reading tensor data")
            got += n
    if not buffer:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, shape and dtype known before any data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def encode_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header for ``specs`` written in order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_TO_STR[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def write_tensor_bytes(f: BinaryIO, spec: TensorSpec, tensor: "torch.Tensor | TensorInfo") -> None:
    """Write a tensor's raw bytes after checking that it matches the header's promise.

    ``tensor`` may also be a :class:`TensorInfo`: its stored bytes are copied unchanged, without
    decoding them (``f`` then needs a ``copy_from(path, offset, length)`` method, as
    :class:`~upcycle.io.staged.StagedFile` has).
    """
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise RuntimeError(f"internal error: {spec.name} planned as {spec.dtype}{list(spec.shape)}, "
                           f"produced {tensor.dtype}{list(tensor.shape)}")
    if spec.nbytes == 0:
        return
    if isinstance(tensor, TensorInfo):
        f.copy_from(tensor.file, tensor.start, tensor.nbytes)
        return
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    f.write(memoryview(data))
