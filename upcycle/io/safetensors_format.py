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
from typing import BinaryIO, Iterable

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

    Checked as the format specifies: the header is a JSON object without duplicate keys, an optional
    ``__metadata__`` maps strings to strings, every tensor has a known ``dtype``, a ``shape`` of
    non-negative integers and ``data_offsets`` ``[begin, end]`` that match its size, and the tensors
    cover the data section exactly (no overlap, no gap, nothing after it). Raises
    :class:`CorruptCheckpointError` naming the file and the tensor otherwise.
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
        header = _parse_header_json(path, f.read(header_len))
    data_offset = 8 + header_len
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        dtype, shape, (start, end) = _check_entry(path, name, entry)
        info = TensorInfo(path, dtype, shape, data_offset + start, data_offset + end)
        if end - start != info.nbytes:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has {end - start} bytes, "
                                         f"its shape and dtype need {info.nbytes}")
        infos[name] = info
    _check_layout(path, infos, data_offset, size)
    return infos, metadata, data_offset


def _parse_header_json(path: Path, raw: bytes) -> dict:
    def no_duplicates(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise CorruptCheckpointError(f"{path}: safetensors header names {dup!r} twice")
        return dict(pairs)

    try:
        header = json.loads(raw, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, "
                                     "not an object of tensors")
    return header


def _check_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{path}: safetensors '__metadata__' must map strings to strings")
    return metadata


def _is_index(value: object) -> bool:
    """A non-negative JSON integer (not a bool, not a float such as 1e400)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"{where}: header entry is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in STR_TO_DTYPE:
        raise CorruptCheckpointError(f"{where}: unsupported or missing dtype {dtype!r}; "
                                     f"known: {', '.join(sorted(STR_TO_DTYPE))}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise CorruptCheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(x) for x in offsets):
        raise CorruptCheckpointError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
    start, end = offsets
    if start > end:
        raise CorruptCheckpointError(f"{where}: data_offsets {offsets} end before they begin")
    return STR_TO_DTYPE[dtype], tuple(shape), (start, end)


def _check_layout(path: Path, infos: dict[str, TensorInfo], data_offset: int, size: int) -> None:
    """Tensors tile the data section: sorted by offset, each begins where the previous one ended."""
    position = data_offset
    for name, info in sorted(infos.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != position:
            what = "overlaps the previous tensor" if info.start < position else "leaves a gap before it"
            raise CorruptCheckpointError(f"{path}: tensor {name!r} {what} (data_offsets begin at "
                                         f"{info.start - data_offset}, expected {position - data_offset})")
        position = info.end
    if position > size:
        raise CorruptCheckpointError(f"{path}: truncated safetensors file: data ends at byte "
                                     f"{position}, file has {size}")
    if position < size:
        raise CorruptCheckpointError(f"{path}: {size - position} bytes after the last tensor that no "
                                     "tensor covers (corrupt safetensors file)")


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a positioned read (no memory map, so resident memory stays bounded).

    The bytes go straight into an uninitialised tensor (a ``bytearray`` would first be zero-filled: one
    more pass over every byte, a tenth of a streamed verify's time on the 1.1B model).
    """
    size = info.end - info.start
    if size == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buffer = torch.empty(size, dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        view = memoryview(buffer.numpy())
        got = 0
        while got < size:
            n = os.preadv(f.fileno(), [view[got:]], info.start + got)
            if n == 0:
                raise CorruptCheckpointError(f"{info.file}: truncated while reading tensor data")
            got += n
    return buffer.view(info.dtype).reshape(info.shape)


def advise_will_need(infos: Iterable[TensorInfo]) -> None:
    """Ask the kernel to start reading these tensors' bytes into the page cache (``POSIX_FADV_WILLNEED``).

    A hint only: it returns without waiting for the disk where the platform supports it, and does nothing
    elsewhere. Callers that will :func:`read_tensor` the tensors soon get the disk reads overlapped with
    their own work.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    ranges: dict[Path, list[tuple[int, int]]] = {}
    for info in infos:
        if info.end > info.start:
            ranges.setdefault(info.file, []).append((info.start, info.end))
    for path, spans in ranges.items():
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            for start, end in spans:
                advise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


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
