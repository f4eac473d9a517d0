"""`upcycle train` and `inspect --routing` on tiny converted models (CPU, a few seconds per run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import make_dense, read_json, save_tiny_tokenizer

from upcycle.convert import convert
from upcycle.cli import cli

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a of to and in is it that was for on are as with his they at be this from".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def _moe(folder: Path, family: str = "llama", **recipe) -> Path:
    dense = make_dense(family, folder / f"{family}-dense")
    save_tiny_tokenizer(dense)
    out = folder / f"{family}-moe"
    convert(dense, out, quiet=True, **{"num_experts": 4, "top_k": 2, **recipe})
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Mixtral upcycled from llama (router std 0.5: an uneven start) and a learnable text."""
    folder = tmp_path_factory.mktemp("train")
    lines = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(10 + (7 * i) % 30)) for i in range(300)]
    (folder / "data.txt").write_text("\n".join(lines))
    return {"folder": folder, "moe": _moe(folder, router_std=0.5), "data": folder / "data.txt"}


def _train(work, name, **options):
    from upcycle.train import train

    model = options.pop("model", work["moe"])
    settings = dict(max_steps=20, seq_len=32, batch_size=8, learning_rate=3e-3, logging_steps=5, save_steps=1000,
                    quiet=True)
    settings.update(options)
    return train(model, work["data"], work["folder"] / name, **settings)


def _routing_cv(model: Path, data: Path) -> float:
    from upcycle.train import measure_routing

    return measure_routing(model, data, seq_len=32)["cv_mean"]


def test_loss_falls_and_checkpoint_reloads_as_native_class(work):
    from transformers import AutoModelForCausalLM

    result = _train(work, "run", max_steps=30)
    assert result.steps == 30
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    model = AutoModelForCausalLM.from_pretrained(work["folder"] / "run")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.output_router_logits is False and model.config.use_cache is True
    recipe = read_json(work["folder"] / "run" / "upcycle_recipe.json")
    assert recipe["method"] == "replicate" and recipe["upcycle"]["exact"] is False
    run = recipe["upcycle"]["training"][-1]
    assert run["steps"] == 30 and run["seq_len"] == 32 and run["expert_load"]["num_experts"] == 4
    card = (work["folder"] / "run" / "README.md").read_text()
    assert "upcycled from" in card and "## Fine-tuning run 1" in card
    summary = read_json(work["folder"] / "run" / "checkpoints" / "expert_load.json")
    assert len(summary["run"]["share"]) == 3 and abs(sum(summary["run"]["share"][0]) - 1) < 1e-9


@pytest.mark.parametrize("family,cls", [("qwen2", "Qwen2MoeForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM")])
def test_qwen_targets_train_and_reload(work, tmp_path, family, cls):
    from transformers import AutoModelForCausalLM

    moe = _moe(tmp_path, family)
    result = _train(work, f"run-{family}", model=moe, max_steps=12, z_loss_coef=1e-3)
    assert result.losses[-1] < result.losses[0]
    assert type(AutoModelForCausalLM.from_pretrained(work["folder"] / f"run-{family}")).__name__ == cls


def test_aux_loss_reduces_load_imbalance(work):
    """Routers only, same seed: without the balancing loss the identical experts give the router no
    gradient and the load stays uneven; with it the load evens out."""
    _train(work, "aux0", train="routers", learning_rate=1e-2, aux_loss_coef=0.0)
    _train(work, "aux1", train="routers", learning_rate=1e-2, aux_loss_coef=1.0)
    without, with_aux = _routing_cv(work["folder"] / "aux0", work["data"]), _routing_cv(work["folder"] / "aux1", work["data"])
    assert with_aux < 0.6 * without, (with_aux, without)


def test_freezing_keeps_frozen_weights_bit_identical(work):
    from safetensors.torch import load_file

    _train(work, "frozen", max_steps=5, train="experts,routers")
    before = load_file(work["moe"] / "model.safetensors")
    after = load_file(work["folder"] / "frozen" / "model.safetensors")
    assert before.keys() == after.keys()
    trained = {k for k in before if not torch.equal(before[k], after[k])}
    assert trained and all(".experts." in k or k.endswith("block_sparse_moe.gate.weight") for k in trained), trained
    assert any(k.endswith("gate.weight") for k in trained) and any(".experts." in k for k in trained)


def test_lora_merges_into_the_native_class(work):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from safetensors.torch import load_file

    _train(work, "lora", max_steps=4, lora=True, lora_r=4)
    assert type(AutoModelForCausalLM.from_pretrained(work["folder"] / "lora")).__name__ == "MixtralForCausalLM"
    before = load_file(work["moe"] / "model.safetensors")
    after = load_file(work["folder"] / "lora" / "model.safetensors")
    assert before.keys() == after.keys()  # adapters merged, no lora_A/lora_B keys
    assert any(not torch.equal(before[k], after[k]) for k in before if "experts" in k)


def test_resume_continues_from_the_last_checkpoint(work, monkeypatch):
    """A run of 4 steps resumed to 6 takes only the 2 missing optimizer steps, starting at step 4 (a
    restart from scratch would also report 6 steps, but take 6)."""
    from upcycle.train.trainer import UpcycleTrainer

    _train(work, "resume", max_steps=4, save_steps=2)
    taken, real = [], UpcycleTrainer.training_step

    def counting(self, *args, **kwargs):
        taken.append(self.state.global_step)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UpcycleTrainer, "training_step", counting)
    result = _train(work, "resume", max_steps=6, save_steps=2, resume=True)
    assert result.steps == 6 and taken == [4, 5]
    assert len(read_json(work["folder"] / "resume" / "upcycle_recipe.json")["upcycle"]["training"]) == 1


def test_two_processes_with_torchrun(work):
    out = work["folder"] / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "upcycle", "train", str(work["moe"]), "--data", str(work["data"]), "--output", str(out),
           "--max-steps", "4", "--seq-len", "32", "--batch-size", "4", "--logging-steps", "2", "-q"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_json(out / "upcycle_recipe.json")["upcycle"]["training"][-1]
    assert run["world_size"] == 2 and run["steps"] == 4 and run["effective_batch_size"] == 8
    assert proc.stdout.count("wrote ") == 1  # only rank 0 reports


def test_routing_heatmap_is_a_png(work, tmp_path):
    from PIL import Image

    png = tmp_path / "heat.png"
    result = CliRunner().invoke(cli, ["inspect", str(work["moe"]), "--routing", str(work["data"]), "--heatmap",
                                      str(png), "--seq-len", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    routing = json.loads(result.output)["routing"]
    assert routing["layers"] == [0, 1, 2] and len(routing["share"][0]) == 4


def test_data_formats_pack_the_same_tokens(tmp_path):
    from upcycle.train.data import load_packed

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"input_ids": [5, 6, 7]}\n\n{"text": "ignored by the fake"}\n')
    (tmp_path / "d" / "b.txt").write_text("x")
    (tmp_path / "d" / "skip.bin").write_text("not data")

    def fake_tokenizer(text):
        return {"input_ids": [len(text)]}

    packed = load_packed(tmp_path / "d", fake_tokenizer, seq_len=3, eos_token_id=2)
    # a.jsonl: 5 6 7 EOS | 19 EOS ; b.txt: 1 EOS  -> 8 tokens, 2 blocks of 3
    assert packed.blocks.tolist() == [[5, 6, 7], [2, 19, 2]]
    assert torch.equal(packed[1]["labels"], packed[1]["input_ids"])


def test_seq_len_defaults_to_the_model_limit_and_says_so(work):
    """The tiny model allows 256 positions: the default 1024 is capped and the CLI says what it chose."""
    out = work["folder"] / "default-seq"
    result = CliRunner().invoke(cli, ["train", str(work["moe"]), "--data", str(work["data"]), "--output", str(out),
                                      "--max-steps", "2", "--batch-size", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "--seq-len 256: the model's max_position_embeddings" in result.stderr
    run = read_json(out / "upcycle_recipe.json")["upcycle"]["training"][-1]
    assert run["seq_len"] == 256 and "max_position_embeddings" in run["seq_len_chosen"]


@pytest.mark.parametrize(("limit", "requested", "chosen"), [(256, None, 256), (4096, None, 1024), (None, None, 1024),
                                                            (4096, 2048, 2048)])
def test_choose_seq_len(limit, requested, chosen):
    from types import SimpleNamespace

    from upcycle.train.moe_model import choose_seq_len

    config = SimpleNamespace(max_position_embeddings=limit)
    assert choose_seq_len(config, requested)[0] == chosen


@pytest.mark.parametrize("case", ["missing", "empty", "seq_len", "dense", "groups"])
def test_user_errors_are_one_line(work, case):
    folder = work["folder"]
    (folder / "empty.jsonl").write_text("\n")
    model, data, extra = str(work["moe"]), str(work["data"]), ["--seq-len", "32"]
    expected = {"missing": "data not found", "empty": "empty", "seq_len": "max_position_embeddings",
                "dense": "upcycle convert", "groups": "--train"}[case]
    if case == "missing":
        data = str(folder / "nope.txt")
    elif case == "empty":
        data = str(folder / "empty.jsonl")
    elif case == "seq_len":
        extra += ["--seq-len", "100000"]
    elif case == "dense":
        model = str(folder / "llama-dense")
    else:
        extra += ["--train", "experts,banana"]
    result = CliRunner().invoke(cli, ["train", model, "--data", data, "--output", str(folder / f"err-{case}"), *extra])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (folder / f"err-{case}").exists()


def test_gradient_accumulation_keeps_the_router_loss_weight(work):
    """One SGD step on 8 sequences, as 1x8 or as 2 micro-batches of 4: the router moves the same way.
    (Adding the per-micro-batch router loss without averaging would double its weight.)"""
    from safetensors.torch import load_file

    sgd = {"optim": "sgd", "max_grad_norm": 0}
    for batch, accum in ((8, 1), (4, 2)):
        _train(work, f"ga{accum}", max_steps=1, batch_size=batch, grad_accum=accum, learning_rate=1.0,
               aux_loss_coef=1.0, z_loss_coef=1.0, extra_args=sgd)
    base = load_file(work["moe"] / "model.safetensors")
    one, two = (load_file(work["folder"] / f"ga{a}" / "model.safetensors") for a in (1, 2))
    for key in (k for k in base if k.endswith("gate.weight")):
        ratio = float((two[key] - base[key]).norm() / (one[key] - base[key]).norm())
        assert 0.9 < ratio < 1.1, (key, ratio)


def test_bundled_model_trains_and_keeps_its_code(work, tmp_path):
    """The bundled UpcycleMoeForCausalLM: trains, reloads, ships its code."""
    from transformers import AutoModelForCausalLM

    moe = _moe(tmp_path, target="upcycle")
    result = _train(work, "bundled", model=moe, max_steps=12, z_loss_coef=1e-3, train="experts,routers")
    assert result.losses[-1] < result.losses[0]
    out = work["folder"] / "bundled"
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "UpcycleMoeForCausalLM"
    assert {p.name for p in moe.glob("*.py")} <= {p.name for p in out.glob("*.py")}
    assert read_json(out / "config.json")["router_z_loss_coef"] == 1e-3
