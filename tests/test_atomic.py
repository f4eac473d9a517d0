"""Atomic output: a failure or a signal mid-write leaves nothing under the final name, no temporary
sibling, and the source untouched."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checks import assert_clean_error, fail_writes_after, leftovers, run_cli, tree_hashes
from factories import make_dense

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_dense("qwen2", tmp_path_factory.mktemp("atomic") / "dense")


def test_exception_mid_write_leaves_nothing(tmp_path, dense, monkeypatch):
    import upcycle

    fail_writes_after(monkeypatch, RuntimeError("boom"), after=3)
    before = tree_hashes(dense)
    out = tmp_path / "moe"
    with pytest.raises(RuntimeError, match="boom"):
        upcycle.convert(dense, out, num_experts=4, max_shard_size="50KB", quiet=True)
    assert not out.exists() and leftovers(tmp_path) == []
    assert tree_hashes(dense) == before


def test_ctrl_c_in_process(tmp_path, dense, monkeypatch):
    fail_writes_after(monkeypatch, KeyboardInterrupt(), after=3)
    out = tmp_path / "moe"
    result = run_cli("convert", dense, out, "-q")
    assert result.exit_code == 130
    assert "interrupted: nothing was written" in result.output and "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def test_failure_after_weights_leaves_nothing(tmp_path, dense, monkeypatch):
    """A failure while writing metadata (after every shard is on disk) still removes everything."""
    from upcycle.targets.base import MoeTarget

    def broken(target, plan):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(MoeTarget, "build_config", broken)
    out = tmp_path / "moe"
    assert_clean_error(run_cli("convert", dense, out, "-q"), out, "Input/output error")


def test_nested_output_parent_is_created(tmp_path, dense):
    out = tmp_path / "a" / "b" / "moe"
    assert run_cli("convert", dense, out, "-e", "2", "-k", "1", "-q").exit_code == 0
    assert (out / "model.safetensors").is_file() and leftovers(out.parent) == []


@pytest.fixture(scope="module")
def big_dense(tmp_path_factory) -> Path:
    """About 25 MB of dense FFN weights; with 8 experts the output is about 200 MB in 10 MB shards."""
    return make_dense("llama", tmp_path_factory.mktemp("big") / "dense", hidden_size=128, intermediate_size=8192,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_write(tmp_path, big_dense, sig):
    before = tree_hashes(big_dense)
    out = tmp_path / "moe"
    proc = subprocess.Popen([sys.executable, "-m", "upcycle", "convert", str(big_dense), str(out), "-e", "8", "-k", "2",
                             "--max-shard-size", "10MB", "-q"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [p for p in tmp_path.glob(".moe.upcycle-tmp-*")]
            if tmp and len(list(tmp[0].glob("model-*.safetensors"))) >= 2:  # first shard done, second begun
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"conversion ended before the signal: {proc.communicate()}"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "interrupted: nothing was written" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert tree_hashes(big_dense) == before
