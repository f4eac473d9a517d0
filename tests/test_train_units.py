"""The parts of ``upcycle train`` that decide where a run starts and what it may overwrite, and the settings
it hands the Trainer, without training (the runs themselves are in test_train.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from upcycle.errors import OutputExistsError, RecipeError, SourceNotFoundError
from upcycle.train import run
from upcycle.train.run import TrainOptions


def _checkpoints(output: Path, *steps: int) -> None:
    for step in steps:
        folder = output / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")


def test_resume_picks_the_last_checkpoint(tmp_path):
    _checkpoints(tmp_path / "out", 2, 10, 4)
    last = run._resume_checkpoint(tmp_path / "out", TrainOptions(resume=True))
    assert Path(last) == tmp_path / "out" / "checkpoints" / "checkpoint-10"
    # --resume wins over --force: nothing is started over
    assert Path(run._resume_checkpoint(tmp_path / "out", TrainOptions(resume=True, force=True))).name == "checkpoint-10"


@pytest.mark.parametrize("setup", ["none", "empty_output", "empty_checkpoints", "no_checkpoint_folder"])
def test_resume_without_a_checkpoint_is_refused(tmp_path, setup):
    out = tmp_path / "out"
    if setup != "none":
        out.mkdir()
    if setup == "empty_checkpoints":
        (out / "checkpoints").mkdir()
    if setup == "no_checkpoint_folder":
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "notes").mkdir()
    with pytest.raises(SourceNotFoundError, match=r"--resume: no checkpoint-N folder in .*checkpoints"):
        run._resume_checkpoint(out, TrainOptions(resume=True))


def test_a_used_output_needs_resume_or_force_and_is_left_alone(tmp_path):
    out = tmp_path / "out"
    _checkpoints(out, 2)
    (out / "model.safetensors").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="exists and is not empty; pass --resume to continue its last "
                                                "checkpoint or --force to train over it$"):
        run._resume_checkpoint(out, TrainOptions())
    assert run._resume_checkpoint(out, TrainOptions(force=True)) is None   # start over, from step 0
    assert (out / "model.safetensors").read_bytes() == b"old" and (out / "checkpoints" / "checkpoint-2").is_dir()


def test_a_new_or_empty_output_starts_from_scratch(tmp_path):
    assert run._resume_checkpoint(tmp_path / "new", TrainOptions()) is None
    (tmp_path / "empty").mkdir()
    assert run._resume_checkpoint(tmp_path / "empty", TrainOptions()) is None


@pytest.mark.parametrize("force", [False, True])
def test_an_output_that_is_a_file_is_refused(tmp_path, force):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is a file"):
        run._resume_checkpoint(tmp_path / "out", TrainOptions(force=force))
    assert (tmp_path / "out").read_text() == "x"


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "--batch-size must be >= 1, got 0"), ("grad_accum", 0, "--grad-accum must be >= 1, got 0"),
    ("save_steps", 0, "--save-steps must be >= 1, got 0"), ("logging_steps", -1, "--logging-steps must be >= 1, got -1"),
    ("lora_r", 0, "--lora-r must be >= 1, got 0"), ("max_steps", 0, "give --max-steps > 0 or --epochs > 0"),
    ("epochs", 0.0, "give --max-steps > 0 or --epochs > 0"),
    ("learning_rate", 0.0, "--learning-rate must be > 0 and --warmup >= 0"),
    ("warmup", -1, "--learning-rate must be > 0 and --warmup >= 0"), ("aux_loss_coef", -0.1, "--aux-loss-coef must be >= 0"),
    ("z_loss_coef", -1e-3, "--z-loss-coef must be >= 0"),
])
def test_invalid_options(field, value, message):
    import re

    with pytest.raises(RecipeError, match=f"^{re.escape(message)}$"):
        TrainOptions(**{field: value}).validate()


def test_valid_edge_options():
    for options in (TrainOptions(batch_size=1, grad_accum=1, save_steps=1, logging_steps=1, lora_r=1, warmup=0),
                    TrainOptions(max_steps=-1, epochs=0.5), TrainOptions(max_steps=3, epochs=0.0),
                    TrainOptions(aux_loss_coef=0.0, z_loss_coef=0.0), TrainOptions(aux_loss_coef=None)):
        assert options.validate() is options


def test_training_arguments(tmp_path):
    options = TrainOptions(max_steps=7, epochs=2.0, learning_rate=1e-4, batch_size=3, grad_accum=2, warmup=1,
                           save_steps=5, logging_steps=4, seed=11, weight_decay=0.1, lr_scheduler="cosine",
                           quiet=True, extra_args={"adam_beta2": 0.95})
    args = run._training_arguments(tmp_path / "out", options)
    assert Path(args.output_dir) == tmp_path / "out" / "checkpoints"
    assert (args.max_steps, args.num_train_epochs, args.learning_rate) == (7, 2.0, 1e-4)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.warmup_steps) == (3, 2, 1)
    assert (args.save_steps, args.save_total_limit, args.logging_steps) == (5, 2, 4)  # the last two kept
    assert (args.seed, args.data_seed, args.weight_decay, args.adam_beta2) == (11, 11, 0.1, 0.95)
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "cosine" and args.report_to in ([], "none", ["none"])
    assert args.disable_tqdm is True and args.remove_unused_columns is False and args.bf16 is False
    assert args.ddp_find_unused_parameters is True and args.use_cpu is (not torch.cuda.is_available())
    (name, off), = run._checkpointing_arg(False).items()
    assert getattr(args, name) is False
    on = run._training_arguments(tmp_path / "out", TrainOptions(max_steps=1, bf16=True, gradient_checkpointing=True))
    assert on.bf16 is True and getattr(on, name) is True


def test_extra_args_replace_defaults_but_not_options(tmp_path):
    args = run._training_arguments(tmp_path / "out", TrainOptions(
        max_steps=1, extra_args={"save_total_limit": 5, "ddp_find_unused_parameters": False}))
    assert args.save_total_limit == 5 and args.ddp_find_unused_parameters is False  # was a TypeError
    with pytest.raises(RecipeError, match=r"extra_args sets learning_rate, seed.*TrainOptions\.learning_rate, "
                                          r"TrainOptions\.seed instead"):
        TrainOptions(extra_args={"seed": 3, "learning_rate": 1.0}).validate()
    options = {f.name for f in dataclasses.fields(TrainOptions)} | {"output"}
    assert set(run.OPTION_OWNED_ARGS.values()) <= options  # the error names options that exist


def test_checkpointing_argument_name():
    from transformers import TrainingArguments

    (name, value), = run._checkpointing_arg(True).items()
    assert value is True and name in {f for f in TrainingArguments.__dataclass_fields__}
    assert name.endswith("_checkpointing") and run._checkpointing_arg(False) == {name: False}


def test_eos_id():
    config = SimpleNamespace(eos_token_id=[5, 6])
    assert run.eos_id(SimpleNamespace(eos_token_id=3), config) == 3
    assert run.eos_id(None, config) == 5
    assert run.eos_id(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=9)) == 9
    assert run.eos_id(None, SimpleNamespace(eos_token_id=None)) is None


def test_fsdp_launch_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(run, "_has_accelerator", lambda: False)
    for value in ("true", "TRUE", "True"):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
        with pytest.raises(RecipeError, match="FSDP was requested"):
            run._check_sharding_launcher()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    run._check_sharding_launcher()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    run._check_sharding_launcher()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(run, "_has_accelerator", lambda: True)
    run._check_sharding_launcher()


def test_has_accelerator_matches_torch():
    assert run._has_accelerator() is torch.cuda.is_available() or torch.accelerator.is_available()


def test_load_brief():
    assert run._load_brief(None) is None and run._load_brief({}) is None
    stats = {"num_experts": 4, "tokens": 100, "cv_mean": 0.123456, "cv_max": 0.512345, "min_share_overall": 0.104321,
             "max_share_overall": 0.41234, "cv": [0.11111, 0.22222]}
    assert run._load_brief(stats) == {"num_experts": 4, "tokens": 100, "cv_mean": 0.1235, "cv_max": 0.5123,
                                      "min_share": 0.1043, "max_share": 0.4123, "cv_per_layer": [0.1111, 0.2222]}


def test_dtype_of():
    assert run._dtype_of(SimpleNamespace(dtype="bfloat16")) is torch.bfloat16
    assert run._dtype_of(SimpleNamespace(dtype=torch.float16)) is torch.float16
    assert run._dtype_of(SimpleNamespace()) is None


class _Trainer:
    """What ``_save_final`` uses of a Trainer: the model, save_model, the sharding flags."""

    def __init__(self, model, fsdp=False):
        self.model = model
        self.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
        self.is_fsdp_enabled, self.is_deepspeed_enabled = fsdp, False
        self.saved = []

    def save_model(self, folder):
        self.saved.append((folder, next(self.model.parameters()).dtype, self.model.config.to_dict()))


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    return MixtralForCausalLM(config)


@pytest.mark.parametrize("fsdp", [False, True])
def test_save_final_restores_the_config_and_the_dtype(tmp_path, fsdp):
    model = _tiny_mixtral()
    model.config.use_cache = False               # as training set it
    model.config.output_router_logits = True
    trainer = _Trainer(model, fsdp)
    run._save_final(trainer, tmp_path, TrainOptions(), {"use_cache": True, "output_router_logits": None},
                    (0.02, 0.001), torch.bfloat16)
    (folder, dtype, config), = trainer.saved
    assert folder == str(tmp_path)
    assert config["use_cache"] is True and "output_router_logits" not in vars(model.config)
    assert config["router_aux_loss_coef"] == 0.02
    assert dtype == (torch.float32 if fsdp else torch.bfloat16)   # sharded weights are saved as trained


def test_save_final_with_lora_merges_and_saves_model_and_tokenizer(tmp_path):
    """LoRA runs save the merged model themselves (cast back to the checkpoint's dtype) and the tokenizer."""
    merged = _tiny_mixtral()
    saved = []
    wrapper = SimpleNamespace(merge_and_unload=lambda: merged)
    trainer = SimpleNamespace(model=wrapper, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              args=SimpleNamespace(should_save=True),
                              processing_class=SimpleNamespace(save_pretrained=saved.append))
    run._save_final(trainer, tmp_path, TrainOptions(lora=True), {"use_cache": True}, (0.01, 0.0), torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert saved == [tmp_path] and merged.config.use_cache is True and merged.config.router_aux_loss_coef == 0.01
    trainer.processing_class = None   # no tokenizer: the model alone
    run._save_final(trainer, tmp_path / "b", TrainOptions(lora=True), {}, (0.01, 0.0), None)
    assert (tmp_path / "b" / "model.safetensors").is_file()
    trainer.args.should_save = False  # not the main process: nothing written
    run._save_final(trainer, tmp_path / "c", TrainOptions(lora=True), {}, (0.01, 0.0), None)
    assert not (tmp_path / "c").exists()
