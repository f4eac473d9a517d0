"""``train()``: fine-tune an upcycled MoE checkpoint with transformers' Trainer."""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import accelerate
import torch
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint import library_versions, model_folder
from ..errors import OutputExistsError, RecipeError, SourceNotFoundError
from ..recipe import check_number, option_flag
from ..tokenizer import load_tokenizer
from .data import load_packed
from .moe_model import choose_seq_len, freeze_except, load_moe_config, parse_train_groups, router_layers, text_attr
from .monitor import ExpertLoadCallback
from .provenance import copy_code_files, record_training

CHECKPOINTS = "checkpoints"


@dataclass
class TrainOptions:
    """The knobs of ``upcycle train`` (the CLI flags map one to one)."""

    max_steps: int = -1
    epochs: float = 1.0
    learning_rate: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: Optional[int] = None  # None: 1024, or max_position_embeddings when smaller
    warmup: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 500
    logging_steps: int = 10
    resume: bool = False
    force: bool = False
    aux_loss_coef: Optional[float] = None  # None: the model config's router_aux_loss_coef
    z_loss_coef: float = 0.0
    train: str = "all"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    report_to: str = "none"
    quiet: bool = False
    extra_args: dict[str, Any] = field(default_factory=dict)  # any other TrainingArguments field

    def validate(self) -> "TrainOptions":
        for name in ("epochs", "learning_rate", "aux_loss_coef", "z_loss_coef", "weight_decay"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), option_flag(name))
        for name in ("batch_size", "grad_accum", "save_steps", "logging_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{option_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise RecipeError("give --max-steps > 0 or --epochs > 0")
        if self.learning_rate <= 0 or self.warmup < 0:
            raise RecipeError("--learning-rate must be > 0 and --warmup >= 0")
        for name in ("aux_loss_coef", "z_loss_coef", "weight_decay"):
            if (getattr(self, name) or 0) < 0:
                raise RecipeError(f"{option_flag(name)} must be >= 0")
        owned = sorted(k for k in self.extra_args if k in OPTION_OWNED_ARGS)
        if owned:
            raise RecipeError(f"extra_args sets {', '.join(owned)}, which TrainOptions sets already; use "
                              + ", ".join(f"TrainOptions.{OPTION_OWNED_ARGS[k]}" for k in owned) + " instead")
        return self


@dataclass
class TrainResult:
    """What a training run produced."""

    output: Path
    steps: int
    losses: list[float]
    expert_load: Optional[dict[str, Any]]
    run: dict[str, Any]


def _resume_checkpoint(output: Path, options: TrainOptions) -> Optional[str]:
    folder = output / CHECKPOINTS
    if options.resume:
        last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if last is None:
            raise SourceNotFoundError(f"--resume: no checkpoint-N folder in {folder}; train without --resume")
        return last
    if output.is_dir() and any(output.iterdir()) and not options.force:
        raise OutputExistsError(f"output folder {output} exists and is not empty; pass --resume to continue "
                                "its last checkpoint or --force to train over it")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is a file; choose a folder name")
    return None


def eos_id(tokenizer: Any, config: Any) -> Optional[int]:
    """The document separator: the tokenizer's EOS, else the config's (first one when a list)."""
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    if eos is None:
        eos = text_attr(config, "eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


def _apply_lora(model: Any, options: TrainOptions) -> Any:
    """Wrap the model with LoRA adapters (peft ``all-linear``: attention, routers and fused experts)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RecipeError("--lora needs peft: pip install 'upcycle[train]' (or pip install peft)") from None
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train(model_path: str | Path, data: str | Path, output: str | Path,
          options: Optional[TrainOptions] = None, **overrides: Any) -> TrainResult:
    """Fine-tune the MoE at ``model_path`` on ``data``; write the trained model to ``output``.

    Checkpoints go to ``output/checkpoints``; the final model, tokenizer, updated recipe and card to
    ``output``. Works under ``torchrun`` and ``accelerate launch`` (one call per process).
    """
    from transformers import default_data_collator

    # on use, here and below: transformers.Trainer and datasets; eos_id's user (inspect --routing) needs neither
    from .trainer import UpcycleTrainer

    options = dataclasses.replace(options or TrainOptions(), **overrides).validate()
    _check_sharding_launcher()
    model_path, output = model_folder(model_path), Path(output)
    config, num_experts, top_k = load_moe_config(model_path)
    seq_len, seq_len_note = choose_seq_len(config, options.seq_len)
    options = dataclasses.replace(options, seq_len=seq_len)
    groups = parse_train_groups(options.train)
    resume_from = _resume_checkpoint(output, options)
    aux_coef = options.aux_loss_coef if options.aux_loss_coef is not None else \
        float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)

    tokenizer = load_tokenizer(model_path)
    dataset = load_packed(data, tokenizer, options.seq_len, eos_id(tokenizer, config), text_attr(config, "vocab_size"))

    model, layers, restore = _prepare_model(model_path, options, groups, num_experts)
    args = _training_arguments(output, options)
    monitor = ExpertLoadCallback(top_k, layers)
    trainer = UpcycleTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                             processing_class=tokenizer, top_k=top_k, aux_loss_coef=aux_coef,
                             z_loss_coef=options.z_loss_coef, load_monitor=monitor,
                             router_type=getattr(config, "router_type", None) or "softmax")
    result = trainer.train(resume_from_checkpoint=resume_from)
    _save_final(trainer, output, options, restore, (aux_coef, options.z_loss_coef), _dtype_of(config))

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": str(model_path), "data": str(data), "tokens": dataset.num_tokens,
        "sequences": len(dataset), "seq_len": options.seq_len, "seq_len_chosen": seq_len_note,
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4), "learning_rate": options.learning_rate,
        "warmup": options.warmup, "effective_batch_size": options.batch_size * options.grad_accum * args.world_size,
        "world_size": args.world_size, "aux_loss_coef": aux_coef, "z_loss_coef": options.z_loss_coef,
        "train": "lora" if options.lora else ",".join(sorted(groups)),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora": {"r": options.lora_r, "alpha": options.lora_alpha} if options.lora else None,
        "bf16": options.bf16, "seed": options.seed, "final_loss": losses[-1] if losses else result.training_loss,
        "train_loss": result.training_loss, "expert_load": _load_brief((monitor.summary or {}).get("last_window")),
        "versions": library_versions(),
    }
    if args.should_save:
        record_training(model_path, output, run)
        copy_code_files(model_path, output)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(output, trainer.state.global_step, losses, monitor.summary, run)


def _prepare_model(model_path: Path, options: TrainOptions, groups: set[str], num_experts: int):
    """Load in fp32, switch off the in-forward aux loss and the cache, freeze, wrap with LoRA.

    Returns the model, the decoder layer of each router and the config values to restore on save.
    """
    from .trainer import set_model_router_losses

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    restore = {k: getattr(model.config, k, None) for k in ("use_cache", "output_router_logits")}
    set_model_router_losses(model, 0.0, 0.0)
    model.config.use_cache = False
    freeze_except(model, groups, num_experts)
    layers = router_layers(model, num_experts)
    if options.lora:
        model = _apply_lora(model, options)
    return model, layers, restore


#: TrainingArguments fields that a TrainOptions field sets (``extra_args`` may not set them a second time)
OPTION_OWNED_ARGS = {
    "output_dir": "output", "max_steps": "max_steps", "num_train_epochs": "epochs", "learning_rate": "learning_rate",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "warmup_steps": "warmup", "bf16": "bf16", "save_steps": "save_steps", "logging_steps": "logging_steps",
    "seed": "seed", "data_seed": "seed", "weight_decay": "weight_decay", "lr_scheduler_type": "lr_scheduler",
    "report_to": "report_to", "disable_tqdm": "quiet", "activation_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing": "gradient_checkpointing",
}


def _training_arguments(output: Path, options: TrainOptions):
    """The Trainer's arguments: the options' values, upcycle's defaults, then ``extra_args`` over the defaults.

    ``extra_args`` may replace a default (``save_total_limit``, ``ddp_find_unused_parameters``, ...) or add any
    other field, but not a field an option sets: that is refused, naming the option to use instead.
    """
    settings = dict(
        output_dir=str(output / CHECKPOINTS), max_steps=options.max_steps, num_train_epochs=options.epochs,
        learning_rate=options.learning_rate, per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, warmup_steps=options.warmup, bf16=options.bf16,
        save_steps=options.save_steps, save_total_limit=2, logging_steps=options.logging_steps,
        seed=options.seed, data_seed=options.seed, weight_decay=options.weight_decay,
        lr_scheduler_type=options.lr_scheduler, report_to=options.report_to, remove_unused_columns=False,
        disable_tqdm=options.quiet, use_cpu=not _has_accelerator(),
        # experts that get no token in a micro-batch have no gradient: DDP must expect that
        ddp_find_unused_parameters=True, **_checkpointing_arg(options.gradient_checkpointing))
    return TrainingArguments(**{**settings, **options.extra_args})


def _save_final(trainer: Any, output: Path, options: TrainOptions, restore: dict[str, Any],
                router_losses: tuple[float, float], dtype: Any) -> None:
    """Write the trained model (LoRA merged) with its training-time config switches undone and the
    router-loss coefficients of the run in its config."""
    from .trainer import set_model_router_losses, to_dtype_for_save

    final = trainer.accelerator.unwrap_model(trainer.model)
    if options.lora:
        final = final.merge_and_unload()
    for key, value in restore.items():
        if value is not None:
            setattr(final.config, key, value)
        elif key in vars(final.config):  # absent before training: leave it absent
            delattr(final.config, key)
    set_model_router_losses(final, *router_losses)
    if options.lora:
        if trainer.args.should_save:
            to_dtype_for_save(final, dtype)
            final.save_pretrained(output)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(output)
        return
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):  # sharded weights: saved as trained
        to_dtype_for_save(final, dtype)
    trainer.save_model(str(output))


def _dtype_of(config: Any) -> Any:
    dtype = getattr(config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _check_sharding_launcher() -> None:
    """Refuse an FSDP launch on a machine without GPU: accelerate enables FSDP only on accelerators and would
    run plain DDP (every process holding the whole model) without saying so."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not _has_accelerator():
        raise RecipeError(f"FSDP was requested (accelerate launch with an FSDP config), but accelerate "
                          f"{accelerate.__version__} shards only on GPUs and would run unsharded DDP on this CPU-only "
                          "machine; launch without the FSDP config for DDP over gloo, or shard on CPU with "
                          "torchrun --nproc_per_node N examples/fsdp2_train.py (FSDP2 fully_shard)")


def _has_accelerator() -> bool:
    """Whether torch sees a GPU (or other accelerator).

    Without one, TrainingArguments must be told ``use_cpu``: otherwise accelerate does not pick its
    multi-CPU (gloo) mode under torchrun, and each process would train alone; --bf16 needs it too.
    """
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _checkpointing_arg(enabled: bool) -> dict[str, bool]:
    """``activation_checkpointing`` (transformers >= 5.x) or its older name ``gradient_checkpointing``."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _load_brief(stats: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not stats:
        return None
    return {"num_experts": stats["num_experts"], "tokens": stats["tokens"], "cv_mean": round(stats["cv_mean"], 4),
            "cv_max": round(stats["cv_max"], 4), "min_share": round(stats["min_share_overall"], 4),
            "max_share": round(stats["max_share_overall"], 4), "cv_per_layer": [round(c, 4) for c in stats["cv"]]}

