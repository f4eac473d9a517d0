"""The staged (direct I/O) file writer and the undecoded copy of unchanged tensors."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from upcycle.cli import cli
from upcycle.errors import CorruptCheckpointError
from upcycle.io import staged
from upcycle.io.staged import ALIGN, StagedFile

from factories import make_dense


def _write_mixed(path: Path, source: Path, seed: int, staging: int = 3 * ALIGN) -> bytes:
    """Write random pieces and source ranges of odd sizes; return the bytes the file must hold."""
    rng = random.Random(seed)
    src = source.read_bytes()
    expected = bytearray()
    with StagedFile(path, staging_bytes=staging) as f:
        for _ in range(40):
            if rng.random() < 0.5:
                piece = rng.randbytes(rng.randrange(0, 5 * ALIGN))
                f.write(piece)
                expected += piece
            else:
                start = rng.randrange(0, len(src))
                length = rng.randrange(0, len(src) - start)
                f.copy_from(source, start, length)
                expected += src[start:start + length]
        assert f.size == len(expected)
    return bytes(expected)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(random.Random(1).randbytes(7 * ALIGN + 123))
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staged_file_holds_exactly_what_was_written(tmp_path: Path, source: Path, seed: int) -> None:
    out = tmp_path / "out.bin"
    expected = _write_mixed(out, source, seed)
    assert out.read_bytes() == expected  # padding for direct I/O is cut off again


def test_staged_file_without_direct_io(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staged, "_O_DIRECT", 0)
    out = tmp_path / "out.bin"
    expected = _write_mixed(out, source, 3)
    assert out.read_bytes() == expected


def test_staged_file_without_preadv(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "preadv", raising=False)  # macOS has only pread
    out = tmp_path / "out.bin"
    expected = _write_mixed(out, source, 5)
    assert out.read_bytes() == expected


def test_staged_file_falls_back_when_direct_writes_are_refused(tmp_path: Path, source: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if not staged._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    real_write, refused = os.write, []

    def write(fd: int, data) -> int:
        if not refused:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(staged.os, "write", write)
    out = tmp_path / "out.bin"
    expected = _write_mixed(out, source, 4)
    assert refused and out.read_bytes() == expected


def test_copy_from_a_truncated_file_names_it(tmp_path: Path, source: Path) -> None:
    with pytest.raises(CorruptCheckpointError, match="source.bin"):
        with StagedFile(tmp_path / "out.bin") as f:
            f.copy_from(source, source.stat().st_size - 10, 100)


def test_write_errors_surface(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staged.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        with StagedFile(tmp_path / "out.bin", staging_bytes=ALIGN) as f:
            f.write(b"x" * (3 * ALIGN))


def _convert(dense: Path, out: Path) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(cli, ["convert", str(dense), str(out), "-e", "4", "-k", "2", "-q"])
    assert result.exit_code == 0, result.output
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_undecoded_copies_equal_decoded_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                dtype: torch.dtype) -> None:
    """Experts and dense tensors copied byte for byte from the source match the tensor path exactly."""
    from upcycle.io.folder import SafetensorsFolder

    dense = make_dense("llama", tmp_path / "dense")
    weights = {k: v.to(dtype) for k, v in load_file(dense / "model.safetensors").items()}
    save_file(weights, dense / "model.safetensors", metadata={"format": "pt"})
    copied_files = _convert(dense, tmp_path / "copied")
    monkeypatch.setattr(SafetensorsFolder, "stored", lambda self, name: None)
    decoded_files = _convert(dense, tmp_path / "decoded")
    assert (tmp_path / "copied" / "model.safetensors").read_bytes() == \
        (tmp_path / "decoded" / "model.safetensors").read_bytes()
    source = load_file(dense / "model.safetensors")
    expert = copied_files["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert expert.dtype == dtype and torch.equal(expert, source["model.layers.1.mlp.down_proj.weight"])
    assert decoded_files.keys() == copied_files.keys()
