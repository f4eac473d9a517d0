"""FSDP on CPU: accelerate cannot shard there, so ``upcycle train`` refuses an FSDP launch with the fix, and
``examples/fsdp2_train.py`` (FSDP2 ``fully_shard`` over gloo) trains 2 sharded processes to the weights one
process gets on the whole batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import make_dense, save_tiny_tokenizer
from safetensors.torch import load_file

from upcycle.cli import cli
from upcycle.convert import convert

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a of to and in is it that was for on are as with his they at be this from".split()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    dense = make_dense("llama", folder / "dense")
    save_tiny_tokenizer(dense)
    for target in ("mixtral", "upcycle"):
        convert(dense, folder / target, target=target, num_experts=4, top_k=2, router_std=0.5, quiet=True,
                verify=False)
    lines = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(10 + (7 * i) % 30)) for i in range(200)]
    (folder / "data.txt").write_text("\n".join(lines))
    return folder


TEARDOWN_ABORT = "terminate called without an active exception"


def _fsdp2(work: Path, model: str, processes: int, port: int) -> tuple[subprocess.CompletedProcess, Path]:
    """Run examples/fsdp2_train.py; a rerun only for gloo's rare abort at process teardown (seen once in CI,
    not reproduced in 60 local runs), which happens after the weights are written and is not our code."""
    first = _fsdp2_once(work, model, processes, port)
    if first[0].returncode != 0 and TEARDOWN_ABORT in first[0].stderr:
        print(f"teardown abort on the first run, rerunning:\n{first[0].stderr[-3000:]}")
        return _fsdp2_once(work, model, processes, port)
    return first


def _fsdp2_once(work: Path, model: str, processes: int, port: int) -> tuple[subprocess.CompletedProcess, Path]:
    out = work / f"{model}-fsdp{processes}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(port), str(ROOT / "examples" / "fsdp2_train.py"), str(work / model), str(work / "data.txt"), str(out),
           "--steps", "3", "--seq-len", "32", "--batch-size", "4", "--optimizer", "sgd", "--lr", "0.5",
           "--aux-loss-coef", "0"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600), out


@pytest.mark.parametrize(("model", "port"), [("mixtral", 29621), ("upcycle", 29623)])
def test_fsdp2_two_cpu_processes_match_one(work, model, port):
    two, sharded = _fsdp2(work, model, 2, port)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Shard(dim=0)" in two.stdout and "over 2 process(es)" in two.stdout
    one, single = _fsdp2(work, model, 1, port + 1)
    assert one.returncode == 0, one.stderr[-3000:]
    start, a, b = (load_file(p / "model.safetensors") for p in (work / model, single, sharded))
    assert set(a) == set(b) == set(start)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-2 and gap < 1e-3 and gap < moved / 100, (moved, gap)  # float rounding, not a different run


def test_upcycle_train_refuses_fsdp_on_cpu(work, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: accelerate can shard")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = work / "refused"
    result = CliRunner().invoke(cli, ["train", str(work / "mixtral"), "--data", str(work / "data.txt"),
                                      "--output", str(out), "--max-steps", "1", "--seq-len", "32"])
    assert result.exit_code == 2, result.output
    assert "FSDP" in result.output and "examples/fsdp2_train.py" in result.output and "Traceback" not in result.output
    assert not out.exists()
